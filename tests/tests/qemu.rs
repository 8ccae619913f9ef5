//! Real NBD clients against the appliance booted in QEMU (TCG). These need QEMU because
//! only a booted appliance runs its drivers, smoltcp and event loop.

use strata_tests::{scenarios, Platform::Qemu};

#[test]
fn two_disks_round_trip_and_restart() {
    scenarios::two_disks_round_trip_and_restart(Qemu);
}

#[test]
fn default_md() {
    scenarios::default_md(Qemu);
}

#[test]
fn config_exports() {
    scenarios::config_exports(Qemu);
}

#[test]
fn config_error_refused() {
    scenarios::config_error_refused(Qemu);
}

#[test]
fn malformed_input() {
    scenarios::malformed_input(Qemu);
}

#[test]
fn stacked_mirror_failover_resync_restart() {
    scenarios::stacked_mirror_failover_resync_restart(Qemu);
}

#[test]
fn live_changes_and_forced_destroy() {
    scenarios::live_changes_and_forced_destroy(Qemu);
}

#[test]
fn partitions_from_host_tools() {
    scenarios::partitions_from_host_tools(Qemu);
}

#[test]
fn labelling_does_not_stall_other_clients() {
    scenarios::labelling_does_not_stall_other_clients(Qemu);
}

#[test]
fn forged_label_in_raw_export() {
    scenarios::forged_label_in_raw_export(Qemu);
}

#[test]
fn changes_need_the_token() {
    scenarios::changes_need_the_token(Qemu);
}

#[test]
fn clean_stop_drains_writes() {
    scenarios::clean_stop_drains_writes(Qemu);
}

#[test]
fn raid5_member_failure_rebuild_restart() {
    scenarios::raid5_member_failure_rebuild_restart(Qemu);
}

#[test]
fn eli_volumes_move_between_strata_and_qemu() {
    scenarios::eli_volumes_move_between_strata_and_qemu(Qemu);
}

#[test]
fn gbde_volumes_keep_data_and_refuse_wrong_passphrases() {
    scenarios::gbde_volumes_keep_data_and_refuse_wrong_passphrases(Qemu);
}
