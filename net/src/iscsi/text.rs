//! Text keys (RFC 7143 §6): the `key=value\0` pairs of Login and Text
//! PDUs, parsed strictly, and the values negotiated from them.

use alloc::string::String;
use alloc::vec::Vec;

/// Longest text a login or text exchange may gather across PDUs with the
/// C bit (the initiator's keys of one stage).
pub const TEXT_MAX: usize = 64 * 1024;

/// Why a text segment is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextError {
    /// A pair without `=`, an empty or over-long key, bytes that are not
    /// UTF-8, or a key given twice.
    Malformed,
}

/// Splits a data segment into its `key=value` pairs, in order. A final
/// pair may lack its NUL; padding NULs are skipped.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = core::str::from_utf8(item).map_err(|_| TextError::Malformed)?;
        let (k, v) = s.split_once('=').ok_or(TextError::Malformed)?;
        if k.is_empty() || k.len() > 63 || !k.bytes().all(key_char) {
            return Err(TextError::Malformed);
        }
        if out.iter().any(|(o, _)| o == k) {
            return Err(TextError::Malformed);
        }
        out.push((String::from(k), String::from(v)));
    }
    Ok(out)
}

/// RFC 7143 §6.1: key names are letters, digits, `.`, `-`, `+`, `@`,
/// `_`, `:`, `[`, `]`.
fn key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b".-+@_:[]".contains(&b)
}

/// Appends `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// A numeric value: decimal, or hex with `0x` (RFC 7143 §6.1).
pub fn number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse().ok()
    } else {
        None
    }
}

/// A boolean value (`Yes`/`No`).
pub fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// The operational parameters of a session, from the defaults of RFC
/// 7143 §13 and what the login negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Headers carry a CRC32C digest.
    pub header_digest: bool,
    /// Data segments carry a CRC32C digest.
    pub data_digest: bool,
    /// Unsolicited Data-Out PDUs are not allowed.
    pub initial_r2t: bool,
    /// Data may come in the SCSI Command PDU.
    pub immediate_data: bool,
    /// Most data the initiator takes in one PDU (what the target sends).
    pub send_segment: u32,
    /// Most data the target takes in one PDU (what it declared).
    pub recv_segment: u32,
    /// Most data in one sequence of solicited Data-Out or of Data-In.
    pub max_burst: u32,
    /// Most unsolicited data (immediate and unsolicited Data-Out).
    pub first_burst: u32,
    /// R2Ts outstanding per task.
    pub max_outstanding_r2t: u32,
    /// Data PDUs come in offset order.
    pub data_pdu_in_order: bool,
    /// Sequences come in offset order.
    pub data_sequence_in_order: bool,
    /// DefaultTime2Wait.
    pub time2wait: u32,
    /// DefaultTime2Retain.
    pub time2retain: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            initial_r2t: true,
            immediate_data: true,
            send_segment: 8192,
            recv_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            time2wait: 2,
            time2retain: 20,
        }
    }
}

/// What the target offers and can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// MaxRecvDataSegmentLength the target declares.
    pub recv_segment: u32,
    /// Largest MaxBurstLength and FirstBurstLength the target agrees to.
    pub max_burst: u32,
    /// Largest MaxOutstandingR2T the target agrees to.
    pub max_outstanding_r2t: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            recv_segment: 262_144,
            max_burst: 1 << 20,
            max_outstanding_r2t: 16,
        }
    }
}

/// The answer to one operational key, or `None` when the key is not an
/// operational key (the caller answers the rest).
pub enum Answer {
    /// `key=value` goes in the response.
    Reply(String),
    /// The key is declarative and needs no answer.
    Quiet,
    /// The value is not acceptable: the login fails (initiator error).
    Refuse,
}

impl Params {
    /// Negotiates one operational key the initiator offered (RFC 7143
    /// §13), updating the session's parameters.
    pub fn offer(
        &mut self,
        key: &str,
        value: &str,
        lim: &Limits,
        discovery: bool,
    ) -> Option<Answer> {
        use alloc::format;
        let num = |lo: u64, hi: u64| number(value).filter(|n| (lo..=hi).contains(n));
        let a = match key {
            "HeaderDigest" | "DataDigest" => {
                let mut pick = None;
                for v in value.split(',') {
                    if v == "CRC32C" || v == "None" {
                        pick = Some(v);
                        break;
                    }
                }
                match pick {
                    Some(v) => {
                        let on = v == "CRC32C";
                        if key == "HeaderDigest" {
                            self.header_digest = on;
                        } else {
                            self.data_digest = on;
                        }
                        Answer::Reply(String::from(v))
                    }
                    None => Answer::Reply(String::from("Reject")),
                }
            }
            "MaxConnections" => match num(1, 65535) {
                Some(_) => Answer::Reply(String::from("1")),
                None => Answer::Refuse,
            },
            "InitialR2T" => match boolean(value) {
                // OR: the target would take unsolicited data.
                Some(b) => {
                    self.initial_r2t = b;
                    Answer::Reply(String::from(yes_no(b)))
                }
                None => Answer::Refuse,
            },
            "ImmediateData" => match boolean(value) {
                // AND: the target takes immediate data.
                Some(b) => {
                    self.immediate_data = b;
                    Answer::Reply(String::from(yes_no(b)))
                }
                None => Answer::Refuse,
            },
            "MaxRecvDataSegmentLength" => match num(512, 16_777_215) {
                Some(n) => {
                    self.send_segment = n as u32;
                    Answer::Quiet
                }
                None => Answer::Refuse,
            },
            "MaxBurstLength" if !discovery => match num(512, 16_777_215) {
                Some(n) => {
                    self.max_burst = (n as u32).min(lim.max_burst);
                    self.first_burst = self.first_burst.min(self.max_burst);
                    Answer::Reply(format!("{}", self.max_burst))
                }
                None => Answer::Refuse,
            },
            "FirstBurstLength" if !discovery => match num(512, 16_777_215) {
                Some(n) => {
                    self.first_burst = (n as u32).min(lim.max_burst).min(self.max_burst);
                    Answer::Reply(format!("{}", self.first_burst))
                }
                None => Answer::Refuse,
            },
            "DefaultTime2Wait" => match num(0, 3600) {
                Some(n) => {
                    self.time2wait = n as u32;
                    Answer::Reply(format!("{n}"))
                }
                None => Answer::Refuse,
            },
            "DefaultTime2Retain" => match num(0, 3600) {
                Some(_) => {
                    // Sessions are not kept for reconnection (ErrorRecoveryLevel 0).
                    self.time2retain = 0;
                    Answer::Reply(String::from("0"))
                }
                None => Answer::Refuse,
            },
            "MaxOutstandingR2T" if !discovery => match num(1, 65535) {
                Some(n) => {
                    self.max_outstanding_r2t = (n as u32).min(lim.max_outstanding_r2t);
                    Answer::Reply(format!("{}", self.max_outstanding_r2t))
                }
                None => Answer::Refuse,
            },
            "DataPDUInOrder" | "DataSequenceInOrder" if !discovery => match boolean(value) {
                // OR with the target's Yes: always Yes.
                Some(_) => Answer::Reply(String::from("Yes")),
                None => Answer::Refuse,
            },
            "ErrorRecoveryLevel" => match num(0, 2) {
                Some(_) => Answer::Reply(String::from("0")),
                None => Answer::Refuse,
            },
            "IFMarker" | "OFMarker" => Answer::Reply(String::from("No")),
            "IFMarkInt" | "OFMarkInt" => Answer::Reply(String::from("Irrelevant")),
            "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder" => Answer::Reply(String::from("Irrelevant")),
            "iSCSIProtocolLevel" => match num(0, 31) {
                Some(_) => Answer::Reply(String::from("1")),
                None => Answer::Refuse,
            },
            "TaskReporting" => Answer::Reply(String::from("RFC3720")),
            // iSER (RFC 7145) is not offered.
            "RDMAExtensions" => Answer::Reply(String::from("No")),
            "InitiatorRecvDataSegmentLength" | "TargetRecvDataSegmentLength" => {
                Answer::Reply(String::from("Irrelevant"))
            }
            _ => return None,
        };
        Some(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_strictly() {
        let p = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1], (String::from("SessionType"), String::from("Normal")));
        assert_eq!(parse(b"NoEquals\0"), Err(TextError::Malformed));
        assert_eq!(parse(b"=v\0"), Err(TextError::Malformed));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(TextError::Malformed));
        assert_eq!(parse(b"K y=1\0"), Err(TextError::Malformed));
        assert!(parse(b"Last=nonul").is_ok());
    }

    #[test]
    fn numbers_in_both_radices() {
        assert_eq!(number("262144"), Some(262_144));
        assert_eq!(number("0x10"), Some(16));
        assert_eq!(number("-1"), None);
        assert_eq!(number(""), None);
    }

    #[test]
    fn negotiation_follows_the_rfc_rules() {
        let lim = Limits::default();
        let mut p = Params::default();
        let r = |a: Option<Answer>| match a {
            Some(Answer::Reply(s)) => s,
            Some(Answer::Quiet) => String::from("<quiet>"),
            Some(Answer::Refuse) => String::from("<refuse>"),
            None => String::from("<unknown>"),
        };
        assert_eq!(
            r(p.offer("HeaderDigest", "CRC32C,None", &lim, false)),
            "CRC32C"
        );
        assert!(p.header_digest);
        assert_eq!(r(p.offer("DataDigest", "None", &lim, false)), "None");
        assert_eq!(
            r(p.offer("MaxBurstLength", "16776192", &lim, false)),
            "1048576"
        );
        assert_eq!(
            r(p.offer("FirstBurstLength", "16776192", &lim, false)),
            "1048576"
        );
        assert_eq!(
            r(p.offer("MaxRecvDataSegmentLength", "65536", &lim, false)),
            "<quiet>"
        );
        assert_eq!(p.send_segment, 65536);
        assert_eq!(r(p.offer("InitialR2T", "No", &lim, false)), "No");
        assert!(!p.initial_r2t);
        assert_eq!(
            r(p.offer("ImmediateData", "Maybe", &lim, false)),
            "<refuse>"
        );
        assert_eq!(
            r(p.offer("X-com.example.Foo", "1", &lim, false)),
            "<unknown>"
        );
        assert_eq!(
            r(p.offer("MaxBurstLength", "4096", &lim, true)),
            "Irrelevant"
        );
    }
}
