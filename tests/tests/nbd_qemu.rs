//! NBD protocol scenarios against the appliance booted in QEMU (TCG): only a
//! booted appliance runs its drivers, smoltcp and event loop.

use strata_tests::{nbd_clients as nbd, Platform::Qemu};

#[test]
fn multi_conn() {
    nbd::multi_conn(Qemu);
}

#[test]
fn stalled_client() {
    nbd::stalled_client(Qemu);
}

#[test]
fn connection_limit_refuses_cleanly() {
    nbd::connection_limit_refuses_cleanly(Qemu);
}

#[test]
fn simultaneous_clients() {
    nbd::simultaneous_clients(Qemu);
}

#[test]
fn simultaneous_management() {
    nbd::simultaneous_management(Qemu);
}

#[test]
fn fio_many_jobs() {
    nbd::fio_many_jobs(Qemu);
}

#[test]
fn handshake_timeout() {
    nbd::handshake_timeout(Qemu);
}

#[test]
fn qemu_img() {
    nbd::qemu_img(Qemu);
}

#[test]
fn qemu_io_commands() {
    nbd::qemu_io_commands(Qemu);
}

#[test]
fn nbdinfo() {
    nbd::nbdinfo(Qemu);
}

#[test]
fn nbdcopy() {
    nbd::nbdcopy(Qemu);
}

#[test]
fn nbdsh_commands() {
    nbd::nbdsh_commands(Qemu);
}

#[test]
fn fio_verify() {
    nbd::fio_verify(Qemu);
}

#[test]
fn malformed_clients() {
    nbd::malformed_clients(Qemu);
}

#[test]
fn flood_of_large_writes() {
    strata_tests::memory::flood(Qemu, &[]);
}

#[test]
fn http_request_timeout() {
    strata_tests::memory::http_request_timeout(Qemu, &["--http-timeout-ms", "2000"]);
}

#[test]
fn md_too_large() {
    strata_tests::memory::md_too_large(Qemu, &[]);
}
