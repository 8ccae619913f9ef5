//! Real NBD clients against hosted Strata (the same stack as a process).

use strata_tests::{scenarios, Platform::Hosted};

#[test]
fn two_disks_round_trip_and_restart() {
    scenarios::two_disks_round_trip_and_restart(Hosted);
}

#[test]
fn default_md() {
    scenarios::default_md(Hosted);
}

#[test]
fn config_exports() {
    scenarios::config_exports(Hosted);
}

#[test]
fn config_error_refused() {
    scenarios::config_error_refused(Hosted);
}

#[test]
fn malformed_input() {
    scenarios::malformed_input(Hosted);
}

#[test]
fn stacked_mirror_failover_resync_restart() {
    scenarios::stacked_mirror_failover_resync_restart(Hosted);
}

#[test]
fn live_changes_and_forced_destroy() {
    scenarios::live_changes_and_forced_destroy(Hosted);
}

#[test]
fn partitions_from_host_tools() {
    scenarios::partitions_from_host_tools(Hosted);
}

#[test]
fn labelling_does_not_stall_other_clients() {
    scenarios::labelling_does_not_stall_other_clients(Hosted);
}

#[test]
fn forged_label_in_raw_export() {
    scenarios::forged_label_in_raw_export(Hosted);
}

#[test]
fn changes_need_the_token() {
    scenarios::changes_need_the_token(Hosted);
}

#[test]
fn clean_stop_drains_writes() {
    scenarios::clean_stop_drains_writes(Hosted);
}

#[test]
fn raid5_member_failure_rebuild_restart() {
    scenarios::raid5_member_failure_rebuild_restart(Hosted);
}

#[test]
fn eli_volumes_move_between_strata_and_qemu() {
    scenarios::eli_volumes_move_between_strata_and_qemu(Hosted);
}

#[test]
fn gbde_volumes_keep_data_and_refuse_wrong_passphrases() {
    scenarios::gbde_volumes_keep_data_and_refuse_wrong_passphrases(Hosted);
}
