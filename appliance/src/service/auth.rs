//! Who may change the appliance: every management request that is not a
//! read (`GET`, `HEAD`) must carry `Authorization: Bearer TOKEN` with the
//! appliance's token. Reads (`/status`, `/metrics`, `/geom`) stay open for
//! monitoring. An appliance given no token refuses every change.

use alloc::string::String;

/// The appliance's management token, if it was given one.
#[derive(Clone, Default)]
pub struct Auth {
    token: Option<String>,
}

impl core::fmt::Debug for Auth {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never the token itself: this may reach a log.
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// Equality that takes the same time wherever the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Auth {
    /// A credential check against `token` (none: every change refused).
    pub fn new(token: Option<String>) -> Auth {
        Auth {
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// True when a token was given.
    pub fn configured(&self) -> bool {
        self.token.is_some()
    }

    /// Whether a request with `method` and the presented bearer token may
    /// go on; `Err` says why not.
    pub fn check(&self, method: &str, bearer: Option<&str>) -> Result<(), &'static str> {
        if matches!(method, "GET" | "HEAD") {
            return Ok(());
        }
        let Some(token) = &self.token else {
            return Err("this appliance was given no management token: changes are refused");
        };
        match bearer {
            None => Err("a change needs the management token (Authorization: Bearer TOKEN)"),
            Some(b) if same(b.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err("wrong management token"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_need_the_token_and_reads_do_not() {
        let a = Auth::new(Some("s3cret".into()));
        assert_eq!(a.check("GET", None), Ok(()));
        assert_eq!(a.check("POST", Some("s3cret")), Ok(()));
        assert!(a.check("POST", None).is_err());
        assert!(a.check("POST", Some("s3cre")).is_err());
        assert!(a.check("POST", Some("s3cret ")).is_err());
        assert!(a.check("DELETE", Some("x")).is_err());
        let none = Auth::new(None);
        assert!(none.check("POST", Some("")).is_err());
        assert!(Auth::new(Some(String::new()))
            .check("POST", Some(""))
            .is_err());
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
