//! NBD protocol scenarios against hosted Strata (the same stack as a process).

use strata_tests::{nbd_clients as nbd, Platform::Hosted};

#[test]
fn multi_conn() {
    nbd::multi_conn(Hosted);
}

#[test]
fn stalled_client() {
    nbd::stalled_client(Hosted);
}

#[test]
fn connection_limit_refuses_cleanly() {
    nbd::connection_limit_refuses_cleanly(Hosted);
}

#[test]
fn simultaneous_clients() {
    nbd::simultaneous_clients(Hosted);
}

#[test]
fn simultaneous_management() {
    nbd::simultaneous_management(Hosted);
}

#[test]
fn fio_many_jobs() {
    nbd::fio_many_jobs(Hosted);
}

#[test]
fn handshake_timeout() {
    nbd::handshake_timeout(Hosted);
}

#[test]
fn qemu_img() {
    nbd::qemu_img(Hosted);
}

#[test]
fn qemu_io_commands() {
    nbd::qemu_io_commands(Hosted);
}

#[test]
fn nbdinfo() {
    nbd::nbdinfo(Hosted);
}

#[test]
fn nbdcopy() {
    nbd::nbdcopy(Hosted);
}

#[test]
fn nbdsh_commands() {
    nbd::nbdsh_commands(Hosted);
}

#[test]
fn fio_verify() {
    nbd::fio_verify(Hosted);
}

#[test]
fn malformed_clients() {
    nbd::malformed_clients(Hosted);
}

#[test]
fn flood_of_large_writes() {
    // A budget just over one write: most requests wait their turn, and
    // the first of each client's three is larger than what is left.
    strata_tests::memory::flood(Hosted, &["--payload-budget", "40m"]);
}

#[test]
fn http_request_timeout() {
    strata_tests::memory::http_request_timeout(Hosted, &["--http-timeout-ms", "1000"]);
}

#[test]
fn md_too_large() {
    strata_tests::memory::md_too_large(Hosted, &[]);
}
