//! The SCSI command layer (SPC-4, SBC-3) of the iSCSI target.
