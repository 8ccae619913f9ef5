//! Host tests of the service through the same link and session path the
//! platforms drive, over an in-memory transport that copies as smoltcp's
//! rings do.

use super::*;
use geom::config::parse;
use geom::stack::ProviderStats;
use net::session::{PageSlice, TxPiece};

/// A socket in memory: bytes the client sent, bytes the server sent.
#[derive(Default)]
struct Mem {
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
    closed: bool,
}

impl Transport for Mem {
    fn recv(&mut self, pieces: &[PageSlice<'_>], buf: &mut [u8], c: &DataCounters) -> Recv {
        let avail = &self.input[self.pos..];
        if avail.is_empty() {
            return if self.closed {
                Recv::Closed
            } else {
                Recv::WouldBlock
            };
        }
        let mut n = 0;
        for p in pieces {
            let k = p.len.min(avail.len() - n);
            p.page.copy_in(p.offset, &avail[n..n + k], c).unwrap();
            n += k;
            if k < p.len {
                break;
            }
        }
        let k = buf.len().min(avail.len() - n);
        buf[..k].copy_from_slice(&avail[n..n + k]);
        n += k;
        self.pos += n;
        Recv::Got(n)
    }

    fn send(&mut self, pieces: &[TxPiece<'_>], c: &DataCounters) -> Sent {
        let mut n = 0;
        for p in pieces {
            match p {
                TxPiece::Bytes(b) => self.output.extend_from_slice(b),
                TxPiece::Page(s) => {
                    let at = self.output.len();
                    self.output.resize(at + s.len, 0);
                    s.page
                        .copy_out(s.offset, &mut self.output[at..], c)
                        .unwrap();
                }
            }
            n += p.len();
        }
        Sent::Took(n)
    }
}

/// Indices in [`PROTOCOLS`] (checked by `protocol_indices`).
const NBD: usize = 0;
const HTTP: usize = 1;

#[test]
fn protocol_indices() {
    assert_eq!(PROTOCOLS[NBD].name, "nbd");
    assert_eq!(PROTOCOLS[HTTP].name, "http");
}

/// Sends `input` on connection `link` and returns what the server sent
/// until it goes quiet.
fn pump(svc: &mut Service, link: &mut Link, input: &[u8]) -> Vec<u8> {
    let mut t = Mem {
        input: input.to_vec(),
        ..Mem::default()
    };
    for _ in 0..1000 {
        let mut moved = link.receive(svc, &mut t);
        moved |= svc.poll();
        moved |= link.send(svc, &mut t);
        if !moved && t.pos == t.input.len() {
            break;
        }
    }
    t.output
}

fn connect(svc: &mut Service, p: usize) -> Link {
    Link::new(svc.open(p).expect("a connection"))
}

fn export_name_opt(name: &str) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// The management token of the services under test.
const TOKEN: &str = "0123456789abcdef";

fn service(text: &str) -> Service {
    let mut svc = Service::new(&parse_config(text).unwrap(), Vec::new()).unwrap();
    svc.set_token(Some(TOKEN.into()));
    svc
}

#[test]
fn default_is_md0_when_no_disks() {
    let svc = Service::new(&Config::default(), Vec::new()).unwrap();
    assert_eq!(svc.exports().len(), 1);
    assert_eq!(svc.exports()[0].info.name, "md0");
    assert_eq!(svc.exports()[0].info.size_bytes, DEFAULT_MD_BYTES);
}

#[test]
fn missing_provider_names_its_line() {
    let cfg = parse("md create -s 1m md0\nexport nbd a vtbd3\n").unwrap();
    let e = Service::new(&cfg, Vec::new()).err().unwrap();
    assert_eq!(e.line, 2);
    assert!(e.message.contains("vtbd3"), "{}", e.message);
}

#[test]
fn export_options_are_the_protocols() {
    let e = parse_config("md create -s 1m md0\nexport nbd vol md0 sideways\n").unwrap_err();
    assert_eq!((e.line, e.column), (2, 20));
    assert_eq!(e.message, "unexpected 'sideways' (expected ro or rw)");
    let e = parse_config("export nbd vol vtbd0 rx").unwrap_err();
    assert_eq!((e.line, e.column), (1, 22));
    assert!(e.message.contains("rx"));
    let e = parse_config("export smb a b").unwrap_err();
    assert_eq!(e.column, 8);
    assert!(e.message.contains("expected nbd, iscsi)"), "{}", e.message);
    let e = parse_config("export nbd a md0\nexport nbd a md1").unwrap_err();
    assert_eq!((e.line, e.column), (2, 12));
    assert_eq!(e.message, "export 'a' is already defined on line 1");
    // An NBD name is still a plain name.
    let e = parse_config("export nbd a:b c").unwrap_err();
    assert_eq!(
        (
            e.column,
            e.message.contains("'a:b' is not a valid export name")
        ),
        (12, true)
    );
    assert_eq!(parse_config("export nbd a b ro rw").unwrap_err().column, 19);
    // The management protocol serves no exports.
    assert_eq!(parse_config("export http a b").unwrap_err().column, 8);
}

/// The error of a one-line config, as (column, message).
fn iscsi_err(line: &str) -> (usize, String) {
    let e = parse_config(line).unwrap_err();
    assert_eq!(e.line, 1, "{line}: {e}");
    (e.column, e.message)
}

const IQN: &str = "iqn.2026-12.org.strata:disk";

#[test]
fn iscsi_options_parse() {
    let cfg = parse_config(&format!(
        "export iscsi {IQN} md0\n\
         export iscsi {IQN} md1 lun 7 ro\n\
         export iscsi eui.02004567A425678D md2 chap alice twelve-bytes! mutual tgt other-secret1 \
         initiator iqn.2026-12.org.strata:b iqn.2026-12.org.strata:a initiator naa.52004567BA64678D\n\
         export iscsi naa.52004567BA64678D01234567ABCDEF01 md3 lun 16383\n"
    ))
    .unwrap();
    let opts: Vec<_> = cfg
        .exports()
        .map(|(l, e)| protocols::check_export(l, e).unwrap().1)
        .collect();
    assert_eq!(
        opts[0].name.as_deref(),
        Some("iqn.2026-12.org.strata:disk/0")
    );
    assert!(!opts[0].read_only);
    assert_eq!(opts[0].access, protocols::AccessOptions::default());
    assert_eq!(
        opts[1].name.as_deref(),
        Some("iqn.2026-12.org.strata:disk/7")
    );
    assert!(opts[1].read_only);
    let a = &opts[2].access;
    use protocols::Secret::Given;
    assert_eq!(
        a.chap,
        Some(("alice".into(), Given("twelve-bytes!".into())))
    );
    assert_eq!(
        a.mutual,
        Some(("tgt".into(), Given("other-secret1".into())))
    );
    // Sorted, so lines compare as sets.
    assert_eq!(
        a.initiators,
        [
            "iqn.2026-12.org.strata:a",
            "iqn.2026-12.org.strata:b",
            "naa.52004567BA64678D"
        ]
    );
    assert_eq!(
        opts[3].name.as_deref(),
        Some("naa.52004567BA64678D01234567ABCDEF01/16383")
    );
    // Secrets never show in Debug output.
    assert!(!format!("{opts:?}").contains("twelve-bytes"));
}

#[test]
fn iscsi_bad_names() {
    for (name, why) in [
        ("disk", "expected iqn."),
        ("iqn.2026-13.org.x", "date"),
        ("iqn.26-12.org.x", "date"),
        ("iqn.2026-12org.x", "date"),
        ("iqn.2026-12.", "reversed domain"),
        ("iqn.2026-12.:x", "reversed domain"),
        ("iqn.2026-12.org..x", "reversed domain"),
        ("iqn.2026-12.org.Strata:disk", "lowercase"),
        ("iqn.2026-12.org.strata:d_isk", "'_' is not allowed"),
        ("eui.0200", "16 hex digits"),
        ("eui.02004567A425678G", "16 hex digits"),
        ("naa.0200456", "16 or 32 hex digits"),
    ] {
        let (col, msg) = iscsi_err(&format!("export iscsi {name} md0"));
        assert_eq!(col, 14, "{name}");
        assert!(
            msg.contains("is not an iSCSI target name") && msg.contains(why),
            "{name}: {msg}"
        );
    }
    let long = format!("iqn.2026-12.org.strata:{}", "x".repeat(201));
    assert!(iscsi_err(&format!("export iscsi {long} md0"))
        .1
        .contains("longer than 223"));
}

#[test]
fn iscsi_bad_options() {
    let e = |opts: &str| iscsi_err(&format!("export iscsi {IQN} md0 {opts}"));
    // The options start at column 46.
    assert_eq!(
        e("lun 16384"),
        (50, "'16384' is not a LUN (0 to 16383)".into())
    );
    assert_eq!(e("lun -1").0, 50);
    assert_eq!(e("lun 07").0, 50);
    assert_eq!(e("lun"), (49, "'lun' needs a number".into()));
    assert_eq!(e("lun 1 lun 2"), (52, "'lun' given twice".into()));
    assert_eq!(e("ro rw"), (49, "'rw' given twice".into()));
    assert!(e("sideways")
        .1
        .starts_with("unexpected 'sideways' (expected lun"));
    assert_eq!(
        e("chap alice short"),
        (57, "a CHAP secret is 12 to 16 bytes, not 5".into())
    );
    assert!(e("chap alice seventeen-bytes!!").1.contains("not 17"));
    assert_eq!(
        e("chap alice"),
        (56, "'chap' needs a secret after the user name".into())
    );
    assert_eq!(e("chap ro twelve-bytes!").0, 51);
    assert_eq!(
        e("chap alice -k"),
        (59, "'chap' needs a secret name after -k".into())
    );
    assert_eq!(e("chap alice -k a:b").0, 60);
    assert_eq!(
        e("mutual tgt twelve-bytes!"),
        (
            46,
            "'mutual' needs 'chap' too (the initiator authenticates first)".into()
        )
    );
    assert!(e("chap a twelve-bytes! mutual b twelve-bytes!")
        .1
        .contains("must differ"));
    assert_eq!(e("chap a twelve-bytes! chap b twelve-bytes!").0, 67);
    assert_eq!(
        e("initiator"),
        (55, "'initiator' needs one initiator name or more".into())
    );
    assert_eq!(e("initiator ro").0, 56);
    let (col, msg) = e("initiator iqn.2026-12.org.x:a bad");
    assert_eq!(col, 76);
    assert!(msg.starts_with("'bad' is not an initiator name"), "{msg}");
}

#[test]
fn iscsi_lines_of_one_target_agree() {
    let two = |a: &str, b: &str| {
        parse_config(&format!(
            "export iscsi {IQN} md0 {a}\nexport iscsi {IQN} md1 {b}\n"
        ))
    };
    let e = two("", "").unwrap_err();
    assert_eq!((e.line, e.column), (2, 14));
    assert_eq!(
        e.message,
        format!("target {IQN} has a LUN 0 already (line 1)")
    );
    assert!(two("lun 3", "lun 3").is_err());
    two("lun 0", "lun 1 ro").unwrap();
    two(
        "chap u twelve-bytes! initiator iqn.2026-12.a.b:x iqn.2026-12.a.b:y",
        "lun 1 initiator iqn.2026-12.a.b:y iqn.2026-12.a.b:x chap u twelve-bytes!",
    )
    .unwrap();
    let e = two("chap u twelve-bytes!", "lun 1").unwrap_err();
    assert!(
        e.message.contains("same chap (LUN 0 differs) (line 1)"),
        "{}",
        e.message
    );
    let e = two(
        "chap u twelve-bytes! mutual t other-secret1",
        "lun 1 chap u twelve-bytes!",
    )
    .unwrap_err();
    assert!(e.message.contains("same mutual"), "{}", e.message);
    let e = two("initiator iqn.2026-12.a.b:x", "lun 1").unwrap_err();
    assert!(e.message.contains("same initiator"), "{}", e.message);
    // Another target, or the same name over NBD, is no conflict.
    parse_config(&format!(
        "export iscsi {IQN} md0\nexport iscsi {IQN}2 md1 chap u twelve-bytes!\nexport nbd md0 md0\n"
    ))
    .unwrap();
}

#[test]
fn iscsi_exports_carry_name_and_access() {
    let cfg = parse_config(&format!(
        "md create -s 1m md0\nmd create -s 1m md1\n\
         export iscsi {IQN} md0 chap alice -k pw mutual tgt twelve-bytes! initiator iqn.2026-12.a.b:x\n\
         export iscsi {IQN} md1 lun 1 ro chap alice -k pw mutual tgt twelve-bytes! initiator iqn.2026-12.a.b:x\n\
         export nbd md0 md0\n"
    ))
    .unwrap();
    let mut svc = Service::boot(&cfg, Vec::new(), 0).unwrap();
    svc.set_secret("pw", b"from-a-file!");
    while matches!(svc.phase(), Phase::Booting) {
        svc.poll();
    }
    assert!(matches!(svc.phase(), Phase::Serving), "{:?}", svc.phase());
    let (i, _) = protocols::find("iscsi").unwrap();
    let view = svc.exports.view(i);
    assert_eq!(view.len(), 2);
    assert_eq!(view[0].name, "iqn.2026-12.org.strata:disk/0");
    assert_eq!(view[1].name, "iqn.2026-12.org.strata:disk/1");
    assert!(view[1].read_only && !view[0].read_only);
    let want = net::session::ExportAccess {
        chap: Some(("alice".into(), "from-a-file!".into())),
        mutual: Some(("tgt".into(), "twelve-bytes!".into())),
        initiators: vec!["iqn.2026-12.a.b:x".into()],
    };
    assert_eq!(view[0].access, want);
    assert!(!view[0].access.is_open());
    assert!(view[0].access.allows_initiator("IQN.2026-12.A.B:X"));
    assert!(!view[0].access.allows_initiator("iqn.2026-12.a.b:y"));
    assert!(!format!("{:?}", view[0]).contains("from-a-file"));
    // NBD's stays open.
    let (n, _) = protocols::find("nbd").unwrap();
    assert!(svc.exports.view(n)[0].access.is_open());
    assert_eq!(
        (protocols::ISCSI.uri)("127.0.0.1:3260", &view[1].name),
        "iscsi://127.0.0.1:3260/iqn.2026-12.org.strata:disk/1"
    );
}

#[test]
fn iscsi_named_secrets_are_checked_when_served() {
    let boot = |secret: Option<&[u8]>| {
        let cfg = parse_config(&format!(
            "md create -s 1m md0\nexport iscsi {IQN} md0 chap alice -k pw\n"
        ))
        .unwrap();
        let mut svc = Service::boot(&cfg, Vec::new(), 0).unwrap();
        if let Some(s) = secret {
            svc.set_secret("pw", s);
        }
        while matches!(svc.phase(), Phase::Booting) {
            svc.poll();
        }
        match svc.phase() {
            Phase::Failed(e) => e.clone(),
            p => panic!("{p:?}"),
        }
    };
    let e = boot(None);
    assert_eq!(e.line, 2);
    assert!(
        e.message
            .contains("no secret named 'pw' (give it with --secret pw=FILE)"),
        "{}",
        e.message
    );
    assert!(boot(Some(b"twelve-bytes!\n\n\n\n"))
        .message
        .contains("is 17 bytes"));
    assert!(boot(Some(b"\xff\xfe twelve bytes"))
        .message
        .contains("not UTF-8"));
}

#[test]
fn live_iscsi_exports_are_checked_against_the_served_ones() {
    let mut svc = service(&format!(
        "md create -s 1m md0\nmd create -s 1m md1\nexport iscsi {IQN} md1\n"
    ));
    let (code, body) = http_call(
        &mut svc,
        "POST",
        "/geom",
        &format!("export iscsi {IQN} md0 lun 1 chap u twelve-bytes!"),
    );
    assert_eq!(code, 400);
    assert!(
        body.contains("every line for it must give the same chap"),
        "{body}"
    );
    let (code, body) = http_call(
        &mut svc,
        "POST",
        "/geom",
        &format!("export iscsi {IQN} md0"),
    );
    assert_eq!(code, 400);
    assert!(body.contains("exists already"), "{body}");
    let (code, body) = http_call(
        &mut svc,
        "POST",
        "/geom",
        &format!("export iscsi {IQN} md0 lun 1"),
    );
    assert_eq!(code, 200, "{body}");
}

#[test]
fn write_then_read_through_the_service() {
    let mut svc = service("md create -s 1m md0\nexport nbd vol md0\n");
    let mut link = connect(&mut svc, NBD);
    let mut input = export_name_opt("vol");
    let mut w = request(1, 9, 4096, 8192);
    w.extend_from_slice(&[0x5a; 8192]);
    input.extend_from_slice(&w);
    input.extend_from_slice(&request(0, 10, 4096, 8192));
    let out = pump(&mut svc, &mut link, &input);
    // greeting 18 + export reply 10 (NO_ZEROES) + write reply 16 + read reply 16 + data
    assert_eq!(out.len(), 18 + 10 + 16 + 16 + 8192, "{out:?}");
    let data = &out[out.len() - 8192..];
    assert!(data.iter().all(|&b| b == 0x5a));
    let metrics = svc.metrics();
    assert!(
        metrics.contains("strata_provider_copied_bytes_total{provider=\"md0\"} 16384"),
        "{metrics}"
    );
    assert!(
        metrics.contains("strata_nbd_copied_bytes_total 16384"),
        "{metrics}"
    );
    assert!(metrics.contains("strata_nbd_connections 1"), "{metrics}");
    let st = svc.status_json();
    assert!(
        st.contains("\"exports\":[{\"name\":\"vol\",\"provider\":\"md0\""),
        "{st}"
    );
    assert!(st.contains("\"access\":\"r1w1e0\""), "{st}");
    assert!(
        st.contains("\"connections\":{\"nbd\":1,\"http\":0,\"iscsi\":0}"),
        "{st}"
    );
}

#[test]
fn connection_limits_are_the_protocols() {
    let mut svc = service("md create -s 1m md0\nexport nbd vol md0\n");
    let ids: Vec<ConnId> = (0..protocols::NBD.max_connections)
        .map(|_| svc.open(NBD).unwrap())
        .collect();
    assert_eq!(svc.open(NBD), None, "one beyond the limit");
    assert!(
        svc.open(HTTP).is_some(),
        "another protocol's limit is its own"
    );
    svc.close(ids[0]);
    assert!(svc.open(NBD).is_some(), "a place freed");
}

#[test]
fn shutdown_flushes_writable_exports() {
    let mut svc = service(
        "md create -s 1m md0\nmd create -s 1m md1\nexport nbd a md0\nexport nbd b md1 ro\n",
    );
    svc.begin_shutdown();
    assert!(!svc.shutdown_done());
    assert_eq!(svc.open(NBD), None, "no new connection while stopping");
    svc.poll();
    assert!(svc.shutdown_done());
    assert!(svc.stopped());
    let flushes = svc
        .stack()
        .providers()
        .map(|(_, p)| ProviderStats::get(&p.stats.flushes))
        .collect::<Vec<_>>();
    assert_eq!(flushes, [1, 0]);
}

/// Two fake disks holding `images` (zeroed when empty), as the platform
/// hands them over, with their handles.
fn disks(
    images: &[Vec<u8>],
) -> (
    Vec<Box<dyn BlockDevice>>,
    Vec<geom::testing::FakeDiskHandle>,
) {
    disks_n(2, images)
}

#[test]
fn a_config_that_labels_boots_again_on_its_own_labels() {
    let cfg = parse_config("mirror label gm0 vtbd0 vtbd1\nexport nbd vol mirror/gm0\n").unwrap();
    let (devs, handles) = disks(&[]);
    let svc = Service::new(&cfg, devs).unwrap();
    let id = |svc: &Service| {
        let g = svc.stack().find_geom("mirror", "gm0").expect("mirror gm0");
        svc.stack().dumpconf(g)["id"].clone()
    };
    let first = id(&svc);
    drop(svc);
    let images: Vec<Vec<u8>> = handles.iter().map(|h| h.contents()).collect();
    // The second boot finds the mirror by tasting and skips the label
    // line: same mirror, same id, served.
    let (devs, _) = disks(&images);
    let svc = Service::new(&cfg, devs).expect("the same config boots again");
    assert_eq!(id(&svc), first, "not labelled anew");
    assert_eq!(svc.exports()[0].info.name, "vol");
}

#[test]
fn a_partitioned_config_boots_again_on_its_own_table() {
    let cfg = parse_config(
        "part create vtbd0\npart add -t linux-data -s 1m -l a vtbd0\n\
         part add -t linux-data -i 3 vtbd0\nexport nbd a vtbd0p1\nexport nbd c vtbd0p3\n",
    )
    .unwrap();
    let (devs, handles) = disks(&[]);
    let svc = Service::new(&cfg, devs).unwrap();
    let sizes =
        |svc: &Service| -> Vec<u64> { svc.exports().iter().map(|e| e.info.size_bytes).collect() };
    let first = sizes(&svc);
    drop(svc);
    let images: Vec<Vec<u8>> = handles.iter().map(|h| h.contents()).collect();
    let (devs, _) = disks(&images);
    let svc = Service::new(&cfg, devs).expect("the same config boots again");
    assert_eq!(sizes(&svc), first);
}

fn http_call(svc: &mut Service, method: &str, path: &str, body: &str) -> (u16, String) {
    http_call_as(svc, Some(TOKEN), method, path, body)
}

/// A request presenting `token` (none: no Authorization header).
fn http_call_as(
    svc: &mut Service,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut link = connect(svc, HTTP);
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let out = pump(svc, &mut link, req.as_bytes());
    assert!(link.finished(svc), "one request per connection");
    svc.close(link.id());
    let text = String::from_utf8(out).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[test]
fn live_geom_creates_and_exports() {
    let mut svc = service("md create -s 1m md0\nexport nbd vol md0\n");
    let (code, body) = http_call(
        &mut svc,
        "POST",
        "/geom",
        "md create -s 2m md1\n# comment\nexport nbd extra md1 ro\n",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        "{\"applied\":2,\"results\":[{\"line\":1,\"created\":[\"md1\"],\"orphaned\":[],\"removed\":[]},{\"line\":3,\"created\":[],\"orphaned\":[],\"removed\":[],\"exported\":\"extra\"}]}\n"
    );
    assert_eq!(svc.exports().len(), 2);
    assert_eq!(svc.exports()[1].info.name, "extra");
    assert!(svc.exports()[1].info.read_only);
    // A new client reaches the new export.
    let mut link = connect(&mut svc, NBD);
    let mut input = export_name_opt("extra");
    input.extend_from_slice(&request(0, 1, 0, 4096));
    let out = pump(&mut svc, &mut link, &input);
    assert_eq!(out.len(), 18 + 10 + 16 + 4096, "{out:?}");
    let (code, body) = http_call(&mut svc, "GET", "/geom", "");
    assert_eq!(code, 200);
    assert!(body.contains("\"md1\""), "{body}");
    let st = svc.status_json();
    assert!(
        st.contains("\"name\":\"extra\",\"provider\":\"md1\",\"size_bytes\":2097152,\"read_only\":true,\"state\":\"ok\""),
        "{st}"
    );
    assert!(
        st.contains("\"orphaned\":{\"providers\":[],\"exports\":[]}"),
        "{st}"
    );
}

#[test]
fn live_geom_errors_name_line_and_column() {
    let mut svc = Service::new(&Config::default(), Vec::new()).unwrap();
    svc.set_token(Some(TOKEN.into()));
    // A syntax error applies nothing.
    let (code, body) = http_call(
        &mut svc,
        "POST",
        "/geom",
        "md create -s 1m md1\n  bogus x\n",
    );
    assert_eq!(code, 400);
    assert!(
        body.contains("\"error\":\"line 2, column 3: unknown statement 'bogus'"),
        "{body}"
    );
    assert!(
        body.contains("\"line\":2,\"column\":3,\"applied\":0"),
        "{body}"
    );
    assert!(svc.stack().find_provider("md1").is_none());
    // A statement the stack refuses stops there; earlier ones stay.
    let (code, body) = http_call(
        &mut svc,
        "POST",
        "/geom",
        "md create -s 1m md1\n export nbd x nothere\nmd create -s 1m md2\n",
    );
    assert_eq!(code, 400);
    assert!(
        body.contains("line 2, column 15: cannot export 'x'"),
        "{body}"
    );
    assert!(body.contains("\"applied\":1"), "{body}");
    assert!(svc.stack().find_provider("md1").is_some());
    assert!(svc.stack().find_provider("md2").is_none());
    // Export names stay unique.
    let (code, body) = http_call(&mut svc, "POST", "/geom", "export nbd md0 md1");
    assert_eq!(code, 400);
    assert!(body.contains("exists already"), "{body}");
    let (code, body) = http_call(&mut svc, "POST", "/geom", "net dhcp");
    assert_eq!(code, 400);
    assert!(body.contains("boot only"), "{body}");
    let (code, _) = http_call(&mut svc, "POST", "/geom", "\n# nothing\n");
    assert_eq!(code, 400);
    let (code, _) = http_call(&mut svc, "PUT", "/geom", "");
    assert_eq!(code, 405);
}

#[test]
fn forced_destroy_orphans_one_export_only() {
    let mut svc = service("md create -s 1m md0\nmd create -s 1m md1\nexport nbd b md1\n");
    let (code, body) = http_call(
        &mut svc,
        "POST",
        "/geom",
        "nop create md0\nexport nbd a md0.nop\n",
    );
    assert_eq!(code, 200, "{body}");
    // Busy without -f: the export holds it open.
    let (code, body) = http_call(&mut svc, "POST", "/geom", "nop destroy md0.nop");
    assert_eq!(code, 400, "{body}");
    let (code, body) = http_call(&mut svc, "POST", "/geom", "nop destroy -f md0.nop");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"orphaned\":[\"md0.nop\"]"), "{body}");
    let st = svc.status_json();
    assert!(
        st.contains("\"orphaned\":{\"providers\":[\"md0.nop\"],\"exports\":[\"a\"]}"),
        "{st}"
    );
    // A read through the orphaned export gets EIO; the other export serves.
    for (export, errno) in [("a", 5u32), ("b", 0)] {
        let mut link = connect(&mut svc, NBD);
        let mut input = export_name_opt(export);
        input.extend_from_slice(&request(0, 1, 0, 512));
        let out = pump(&mut svc, &mut link, &input);
        let reply = &out[18 + 10..];
        assert_eq!(
            u32::from_be_bytes(reply[4..8].try_into().unwrap()),
            errno,
            "{export}"
        );
    }
}

/// Receives `input` on `link` and runs the service, without sending:
/// replies stay with the session (a client that does not read).
fn receive_only(svc: &mut Service, link: &mut Link, t: &mut Mem, input: &[u8]) {
    t.input.extend_from_slice(input);
    for _ in 0..100 {
        let moved = link.receive(svc, t) | svc.poll();
        if !moved {
            break;
        }
    }
}

fn metric(svc: &Service, name: &str) -> u64 {
    let m = svc.metrics();
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

#[test]
fn the_payload_budget_is_shared_by_every_connection() {
    let mut svc = service("md create -s 1m md0\nexport nbd vol md0\n");
    svc.set_limits(Limits {
        payload_budget_bytes: 8192,
        ..Limits::default()
    });
    // A holds the whole budget in a reply it does not read.
    let (mut a, mut ta) = (connect(&mut svc, NBD), Mem::default());
    let mut input = export_name_opt("vol");
    input.extend_from_slice(&request(0, 1, 0, 8192));
    receive_only(&mut svc, &mut a, &mut ta, &input);
    assert_eq!(svc.payload_in_use(), 8192);
    // B's read waits: its header is taken, nothing behind it is.
    let (mut b, mut tb) = (connect(&mut svc, NBD), Mem::default());
    let mut input = export_name_opt("vol");
    input.extend_from_slice(&request(0, 2, 0, 4096));
    let mut w = request(1, 3, 0, 4096);
    w.extend_from_slice(&[7; 4096]);
    input.extend_from_slice(&w);
    receive_only(&mut svc, &mut b, &mut tb, &input);
    assert_eq!(svc.budget().waiting(), 1);
    assert_eq!(svc.payload_in_use(), 8192, "B holds nothing yet");
    assert_eq!(metric(&svc, "strata_payload_waiting"), 1);
    // A third connection waits behind B, even for a smaller request.
    let (mut c, mut tc) = (connect(&mut svc, NBD), Mem::default());
    let mut input = export_name_opt("vol");
    input.extend_from_slice(&request(0, 4, 0, 512));
    receive_only(&mut svc, &mut c, &mut tc, &input);
    assert_eq!(svc.budget().head(), Some(b.id()));
    assert_eq!(svc.budget().waiting(), 2);
    // A reads its reply: its pages go back (as spares, then given back
    // because B waits), and B, then C, are admitted and answered.
    a.send(&mut svc, &mut ta);
    svc.poll();
    for _ in 0..10 {
        b.receive(&mut svc, &mut tb);
        c.receive(&mut svc, &mut tc);
        svc.poll();
        b.send(&mut svc, &mut tb);
        c.send(&mut svc, &mut tc);
    }
    assert_eq!(tb.output.len(), 18 + 10 + 16 + 4096 + 16, "B's replies");
    assert_eq!(tc.output.len(), 18 + 10 + 16 + 512, "C's reply");
    assert_eq!(svc.budget().waiting(), 0);
    assert!(metric(&svc, "strata_payload_waits_total") >= 2);
    assert!(svc.payload_in_use() <= 8192);
    let st = svc.status_json();
    assert!(st.contains("\"payload_budget_bytes\":8192"), "{st}");
}

#[test]
fn a_request_larger_than_the_budget_runs_alone() {
    let mut svc = service("md create -s 1m md0\nexport nbd vol md0\n");
    svc.set_limits(Limits {
        payload_budget_bytes: 4096,
        ..Limits::default()
    });
    let mut link = connect(&mut svc, NBD);
    let mut input = export_name_opt("vol");
    let mut w = request(1, 1, 0, 65536);
    w.extend_from_slice(&[9; 65536]);
    input.extend_from_slice(&w);
    input.extend_from_slice(&request(0, 2, 0, 65536));
    let out = pump(&mut svc, &mut link, &input);
    assert_eq!(out.len(), 18 + 10 + 16 + 16 + 65536);
    assert!(out[out.len() - 65536..].iter().all(|&b| b == 9));
    assert_eq!(metric(&svc, "strata_payload_oversized_total"), 2);
}

#[test]
fn limits_from_words_and_memory() {
    let mut l = Limits::default();
    assert_eq!(l.set("payload_budget", "64m"), Ok(true));
    assert_eq!(l.set("http_timeout_ms", "1500"), Ok(true));
    assert_eq!(l.set("md_memory", "1g"), Ok(true));
    assert_eq!(l.bio_deadline_ms, geom::disk::DEFAULT_BIO_DEADLINE_MS);
    assert_eq!(l.set("bio_deadline_ms", "3000"), Ok(true));
    assert_eq!(l.bio_deadline_ms, 3000);
    assert_eq!(l.set("loglevel", "debug"), Ok(false));
    assert!(l.set("payload_budget", "lots").is_err());
    assert_eq!(
        (l.payload_budget_bytes, l.http_timeout_ms, l.md_memory_bytes),
        (64 << 20, 1500, Some(1 << 30))
    );
    let l = Limits::for_memory(512 << 20);
    assert_eq!(l.payload_budget_bytes, 128 << 20);
    assert_eq!(l.md_memory_bytes, Some(288 << 20));
}

#[test]
fn md_create_beyond_memory_is_refused_through_the_api() {
    let mut svc = service("md create -s 1m md0\nexport nbd vol md0\n");
    svc.set_limits(Limits {
        md_memory_bytes: Some(16 << 20),
        ..Limits::default()
    });
    let (code, body) = http_call(&mut svc, "POST", "/geom", "md create -s 1g big\n");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("more than the memory left for memory disks"),
        "{body}"
    );
    let (code, body) = http_call(&mut svc, "POST", "/geom", "md create -s 15m small\n");
    assert_eq!(code, 200, "{body}");
    assert!(svc
        .status_json()
        .contains("\"md_committed_bytes\":16777216"));
}

/// A genuine mirror label naming `name` for a disk of `size` bytes: what
/// a client can write into a raw export's last sector.
fn forged_mirror_sector(name: &str, size: u64) -> Vec<u8> {
    geom::testing::label_sector(&alloc::format!("mirror label {name} vtbd0"), size, 512)
}

#[test]
fn a_label_written_into_a_raw_export_is_refused_at_the_next_boot() {
    let cfg = parse_config("export nbd raw vtbd0\nexport nbd other vtbd1\n").unwrap();
    let size = 4u64 << 20;
    let forged = forged_mirror_sector("evil", size);
    let mut img = alloc::vec![0u8; size as usize];
    img[size as usize - 512..].copy_from_slice(&forged);
    let (devs, handles) = disks(&[img]);
    let svc = Service::new(&cfg, devs).expect("the config boots over a forged label");
    assert!(svc.stack().find_geom("mirror", "evil").is_none());
    let names: Vec<&str> = svc.exports().iter().map(|e| e.info.name.as_str()).collect();
    assert_eq!(names, ["raw", "other"]);
    assert_eq!(svc.exports()[0].info.size_bytes, size, "the whole disk");
    let status: serde_json::Value = serde_json::from_str(&svc.status_json()).unwrap();
    let taste = status["taste"].as_array().expect("taste list");
    assert_eq!(taste.len(), 1, "{status}");
    assert_eq!(taste[0]["provider"], "vtbd0");
    assert_eq!(taste[0]["class"], "mirror");
    assert!(taste[0]["reason"].as_str().unwrap().contains("raw"));
    let contents = handles[0].contents();
    assert_eq!(
        &contents[size as usize - 512..],
        &forged[..],
        "bytes intact"
    );
}

#[test]
fn a_label_under_a_nop_of_the_config_is_refused() {
    let cfg = parse_config("nop create vtbd0\nexport nbd n vtbd0.nop\n").unwrap();
    let size = 4u64 << 20;
    let mut img = alloc::vec![0u8; size as usize];
    img[size as usize - 512..].copy_from_slice(&forged_mirror_sector("evil", size));
    let (devs, _) = disks(&[img]);
    let svc = Service::new(&cfg, devs).expect("boots");
    assert!(svc.stack().find_geom("mirror", "evil").is_none());
    assert_eq!(svc.stack().refused_tastes()[0].provider, "vtbd0");
}

#[test]
fn a_config_label_line_is_not_vetoed_by_claims() {
    // vtbd0 and vtbd1 are a label line's members, not claimed: the
    // mirror they hold comes back by tasting.
    let cfg = parse_config("mirror label gm0 vtbd0 vtbd1\nexport nbd vol mirror/gm0\n").unwrap();
    let (devs, handles) = disks(&[]);
    drop(Service::new(&cfg, devs).unwrap());
    let images: Vec<Vec<u8>> = handles.iter().map(|h| h.contents()).collect();
    let (devs, _) = disks(&images);
    let svc = Service::new(&cfg, devs).unwrap();
    assert!(svc.stack().refused_tastes().is_empty());
    assert!(svc.stack().find_geom("mirror", "gm0").is_some());
}

#[test]
fn changes_without_the_token_are_refused_and_change_nothing() {
    let mut svc = service("md create -s 1m md0\nexport nbd vol md0 ro\n");
    let before = svc.status_json();
    for token in [None, Some("wrong"), Some("")] {
        let (code, body) = http_call_as(&mut svc, token, "POST", "/geom", "export nbd rw2 md0\n");
        assert_eq!(code, 401, "{body}");
        let (code, _) = http_call_as(&mut svc, token, "POST", "/shutdown", "");
        assert_eq!(code, 401);
    }
    assert!(!svc.shutdown_done() && !svc.stopped());
    assert_eq!(svc.exports().len(), 1, "no export was added");
    assert_eq!(svc.status_json(), before);
    // Reads need no token.
    let (code, body) = http_call_as(&mut svc, None, "GET", "/status", "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_call_as(&mut svc, None, "GET", "/metrics", "").0, 200);
    // With it, the change is made.
    let (code, body) = http_call(&mut svc, "POST", "/geom", "export nbd rw2 md0\n");
    assert_eq!(code, 200, "{body}");
    assert_eq!(svc.exports().len(), 2);
}

#[test]
fn an_appliance_without_a_token_refuses_every_change() {
    let mut svc =
        Service::new(&parse_config("md create -s 1m md7\n").unwrap(), Vec::new()).unwrap();
    let (code, body) = http_call_as(&mut svc, Some(""), "POST", "/geom", "md create -s 1m md8\n");
    assert_eq!(code, 401);
    assert!(body.contains("no management token"), "{body}");
}

/// Runs a booting service with its clock from `from_ms` on, 10 ms a
/// step, until it serves; returns the clock then.
fn boot_with_clock(svc: &mut Service, from_ms: u64, limit_ms: u64) -> u64 {
    let mut now = from_ms;
    while now < limit_ms {
        svc.set_now_ns(now * 1_000_000);
        svc.tick(now);
        svc.poll();
        match svc.phase() {
            Phase::Serving => return now,
            Phase::Failed(e) => panic!("boot failed: {e:?}"),
            Phase::Booting => {}
        }
        now += 10;
    }
    panic!("not serving after {limit_ms} ms");
}

#[test]
fn a_disk_that_hangs_at_boot_is_given_up_on_and_the_mirror_serves_degraded() {
    let cfg = parse_config("mirror label gm0 vtbd0 vtbd1\nexport nbd vol mirror/gm0\n").unwrap();
    let (devs, handles) = disks(&[]);
    let svc = Service::new(&cfg, devs).unwrap();
    drop(svc);
    let images: Vec<Vec<u8>> = handles.iter().map(|h| h.contents()).collect();
    let (devs, handles) = disks(&images);
    // vtbd1 stops answering before the boot tastes it.
    handles[1].hold(true);
    let mut svc = Service::boot(&cfg, devs, 1).unwrap();
    let mut limits = Limits::default();
    limits.set("bio_deadline_ms", "3000").unwrap();
    svc.set_limits(limits);
    let ready = boot_with_clock(&mut svc, 1, 60_000);
    assert!(
        (3000..10_000).contains(&ready),
        "served after {ready} ms: the deadline is 3000 ms"
    );
    assert_eq!(svc.exports()[0].info.name, "vol");
    let st: serde_json::Value = serde_json::from_str(&svc.status_json()).unwrap();
    let d1 = &st["disks"][1];
    assert_eq!(d1["name"], "vtbd1");
    assert_eq!(d1["state"], "failed");
    assert!(d1["failed"].as_str().unwrap().contains("3000 ms"), "{d1}");
    assert_eq!(st["disks"][0]["state"], "ok");
}

#[test]
fn a_clean_stop_answers_the_requests_it_holds_before_it_flushes() {
    let cfg = parse_config("export nbd vol vtbd0\n").unwrap();
    let (devs, h) = disks(&[]);
    let mut svc = Service::new(&cfg, devs).unwrap();
    let mut link = connect(&mut svc, NBD);
    let out = pump(&mut svc, &mut link, &export_name_opt("vol"));
    assert_eq!(out.len(), 18 + 10);
    h[0].hold(true);
    let mut w = request(1, 7, 0, 8192);
    w.extend_from_slice(&[0x77; 8192]);
    assert!(
        pump(&mut svc, &mut link, &w).is_empty(),
        "the write is held"
    );
    svc.begin_shutdown();
    for _ in 0..10 {
        svc.poll();
    }
    assert_eq!(h[0].queued(), 1, "no flush while a write is open");
    assert!(!svc.shutdown_done());
    h[0].hold(false);
    let out = pump(&mut svc, &mut link, &[]);
    assert_eq!(out.len(), 16, "the write is answered");
    assert_eq!(u32::from_be_bytes(out[4..8].try_into().unwrap()), 0);
    for _ in 0..100 {
        svc.poll();
    }
    assert!(svc.shutdown_done() && svc.stopped());
    assert_eq!(svc.shutdown_result(), Ok(()));
    assert!(
        h[0].durable()[..8192].iter().all(|&b| b == 0x77),
        "flushed after the write"
    );
}

#[test]
fn a_clean_stop_whose_flush_fails_says_so() {
    let cfg = parse_config("export nbd vol vtbd0\nexport nbd other vtbd1\n").unwrap();
    let (devs, h) = disks(&[]);
    let mut svc = Service::new(&cfg, devs).unwrap();
    h[0].fail_next(1);
    svc.begin_shutdown();
    for _ in 0..100 {
        svc.poll();
    }
    assert!(svc.stopped());
    let why = svc.shutdown_result().unwrap_err();
    assert!(
        why.contains("export vol") && !why.contains("other"),
        "{why}"
    );
}

/// `n` fake disks of 4 MiB holding `images` (zeroed where empty).
fn disks_n(
    n: u64,
    images: &[Vec<u8>],
) -> (
    Vec<Box<dyn BlockDevice>>,
    Vec<geom::testing::FakeDiskHandle>,
) {
    (0..n)
        .map(|i| {
            let (d, h) = geom::testing::FakeDisk::new(4 << 20, 512, i);
            if let Some(img) = images.get(i as usize) {
                h.write_at(0, img);
            }
            (Box::new(d) as Box<dyn BlockDevice>, h)
        })
        .unzip()
}

#[test]
fn a_raid5_config_boots_again_rebuilds_a_replaced_disk_and_reports_its_cache() {
    let label = "raid5 label -s 16k r0 vtbd0 vtbd1 vtbd2\nexport nbd vol raid5/r0\n";
    let (devs, handles) = disks_n(4, &[]);
    let svc = Service::new(&parse_config(label).unwrap(), devs).unwrap();
    let status: serde_json::Value = serde_json::from_str(&svc.status_json()).unwrap();
    assert_eq!(status["raid5"][0]["name"], "r0", "{status}");
    let m = svc.metrics();
    assert!(
        m.contains("strata_bufcache_capacity_blocks{cache=\"raid5/r0\"} 1024"),
        "{m}"
    );
    drop(svc);
    // vtbd1 replaced by a blank disk; the config inserts vtbd3.
    let mut images: Vec<Vec<u8>> = handles.iter().map(|h| h.contents()).collect();
    images[1] = vec![0; images[1].len()];
    let insert = format!("{label}raid5 insert r0 vtbd3\n");
    let cfg = parse_config(&insert).unwrap();
    let (devs, handles) = disks_n(4, &images);
    let mut svc = Service::new(&cfg, devs).expect("boots degraded and inserts");
    for _ in 0..10_000 {
        svc.poll();
        let st: serde_json::Value = serde_json::from_str(&svc.status_json()).unwrap();
        if st["raid5"][0]["state"] == "complete" {
            break;
        }
    }
    let st: serde_json::Value = serde_json::from_str(&svc.status_json()).unwrap();
    assert_eq!(st["raid5"][0]["state"], "complete", "{st}");
    assert_eq!(st["raid5"][0]["members"][1]["provider"], "vtbd3", "{st}");
    drop(svc);
    // The same config boots a third time: the insert is on disk already.
    let images: Vec<Vec<u8>> = handles.iter().map(|h| h.contents()).collect();
    let (devs, _) = disks_n(4, &images);
    let svc = Service::new(&cfg, devs).expect("the insert line is done already");
    let st: serde_json::Value = serde_json::from_str(&svc.status_json()).unwrap();
    assert_eq!(st["raid5"][0]["state"], "complete", "{st}");
}

#[test]
fn iscsi_aptpl_needs_a_state_provider_of_its_own() {
    let e = |opts: &str| iscsi_err(&format!("export iscsi {IQN} md0 {opts}"));
    assert_eq!(
        e("aptpl"),
        (
            51,
            "'aptpl' needs the provider that keeps the reservations".into()
        )
    );
    assert_eq!(e("aptpl ro").0, 52);
    assert_eq!(e("aptpl st aptpl st2"), (55, "'aptpl' given twice".into()));
    let e = parse_config(&format!(
        "export iscsi {IQN} md0 aptpl st\nexport iscsi {IQN}2 md1 aptpl st\n"
    ))
    .unwrap_err();
    assert!(e.message.contains("st keeps the state of"), "{}", e.message);
    let boot = |text: String| {
        let mut svc = Service::boot(&parse_config(&text).unwrap(), Vec::new(), 0).unwrap();
        while matches!(svc.phase(), Phase::Booting) {
            svc.poll();
        }
        svc
    };
    let md = "md create -s 1m md0\nmd create -s 128k st\nmd create -s 64k small\n";
    let svc = boot(format!("{md}export iscsi {IQN} md0 aptpl st\n"));
    assert!(matches!(svc.phase(), Phase::Serving), "{:?}", svc.phase());
    let (i, _) = protocols::find("iscsi").unwrap();
    assert!(svc.exports.view(i)[0].keeps_state);
    assert_eq!(
        svc.exports()[0].store.as_ref().map(|s| &s.phase),
        Some(&state::Phase::Ready)
    );
    let failed = |text: String| match boot(text).phase() {
        Phase::Failed(e) => e.message.clone(),
        p => panic!("{p:?}"),
    };
    assert!(failed(format!("{md}export iscsi {IQN} md0 aptpl small\n")).contains("128 KiB"));
    assert!(failed(format!("{md}export iscsi {IQN} md0 aptpl md0\n"))
        .contains("cannot keep its own state"));
    assert!(failed(format!(
        "{md}export nbd st st\nexport iscsi {IQN} md0 aptpl st\n"
    ))
    .contains("used by export 'st'"));
    assert!(failed(format!(
        "{md}export iscsi {IQN} md0 aptpl st\nexport nbd st st\n"
    ))
    .contains("keeps the state of export"));
    // Without aptpl, no state is kept.
    let svc = boot(format!("{md}export iscsi {IQN} md0\n"));
    assert!(!svc.exports.view(i)[0].keeps_state);
}
