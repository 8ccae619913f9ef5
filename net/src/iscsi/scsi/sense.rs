//! Sense data (SPC-4 4.5): the sense keys and additional sense codes the
//! layer reports, and their fixed (70h) and descriptor (72h) formats.

use alloc::vec::Vec;

/// Sense key NO SENSE.
pub const NO_SENSE: u8 = 0x00;
/// Sense key NOT READY.
pub const NOT_READY: u8 = 0x02;
/// Sense key MEDIUM ERROR.
pub const MEDIUM_ERROR: u8 = 0x03;
/// Sense key HARDWARE ERROR.
pub const HARDWARE_ERROR: u8 = 0x04;
/// Sense key ILLEGAL REQUEST.
pub const ILLEGAL_REQUEST: u8 = 0x05;
/// Sense key UNIT ATTENTION.
pub const UNIT_ATTENTION: u8 = 0x06;
/// Sense key DATA PROTECT.
pub const DATA_PROTECT: u8 = 0x07;
/// Sense key ABORTED COMMAND.
pub const ABORTED_COMMAND: u8 = 0x0B;
/// Sense key MISCOMPARE.
pub const MISCOMPARE: u8 = 0x0E;

/// One condition: sense key, additional sense code and qualifier, and the
/// INFORMATION field when it is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// The sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// The INFORMATION field (VALID set when present).
    pub info: Option<u64>,
    /// The CDB byte an INVALID FIELD IN CDB points at (sense-key specific
    /// field pointer, C/D set).
    pub field: Option<u16>,
}

impl Sense {
    /// The same condition pointing at byte `at` of the CDB.
    pub const fn at_cdb(self, at: u16) -> Sense {
        Sense {
            field: Some(at),
            ..self
        }
    }

    /// A condition without INFORMATION.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            field: None,
        }
    }

    /// The same condition with an INFORMATION field.
    pub const fn with_info(self, info: u64) -> Sense {
        Sense {
            info: Some(info),
            ..self
        }
    }

    /// The sense data bytes: descriptor format (72h) when `descriptor`,
    /// else fixed format (70h).
    pub fn to_bytes(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            let mut b = alloc::vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.info {
                // Information sense data descriptor (SPC-4 4.5.2.2).
                b.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                b.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(f) = self.field {
                // Sense key specific descriptor (SPC-4 4.5.2.3): a field
                // pointer into the CDB.
                let [hi, lo] = f.to_be_bytes();
                b.extend_from_slice(&[0x02, 0x06, 0, 0, 0xc0, hi, lo, 0]);
            }
            b[7] = (b.len() - 8) as u8;
            b
        } else {
            let mut b = alloc::vec![0u8; 18];
            b[0] = 0x70;
            b[2] = self.key & 0x0f;
            if let Some(info) = self.info {
                // Fixed format holds 32 bits; a larger value does not fit
                // and VALID stays clear.
                if let Ok(v) = u32::try_from(info) {
                    b[0] |= 0x80;
                    b[3..7].copy_from_slice(&v.to_be_bytes());
                }
            }
            b[7] = 10;
            b[12] = self.asc;
            b[13] = self.ascq;
            if let Some(f) = self.field {
                // SKSV and C/D, then the field pointer (SPC-4 4.5.2.4.2).
                b[15] = 0xc0;
                b[16..18].copy_from_slice(&f.to_be_bytes());
            }
            b
        }
    }
}

/// INVALID COMMAND OPERATION CODE (20h/00h).
pub const INVALID_OPCODE: Sense = Sense::new(ILLEGAL_REQUEST, 0x20, 0x00);
/// LOGICAL BLOCK ADDRESS OUT OF RANGE (21h/00h).
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(ILLEGAL_REQUEST, 0x21, 0x00);
/// INVALID FIELD IN CDB (24h/00h).
pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(ILLEGAL_REQUEST, 0x24, 0x00);
/// LOGICAL UNIT NOT SUPPORTED (25h/00h).
pub const LU_NOT_SUPPORTED: Sense = Sense::new(ILLEGAL_REQUEST, 0x25, 0x00);
/// INVALID FIELD IN PARAMETER LIST (26h/00h).
pub const INVALID_FIELD_IN_PARAM: Sense = Sense::new(ILLEGAL_REQUEST, 0x26, 0x00);
/// INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h).
pub const INVALID_RELEASE: Sense = Sense::new(ILLEGAL_REQUEST, 0x26, 0x04);
/// PARAMETER LIST LENGTH ERROR (1Ah/00h).
pub const PARAM_LIST_LENGTH: Sense = Sense::new(ILLEGAL_REQUEST, 0x1a, 0x00);
/// INVALID FIELD IN COMMAND INFORMATION UNIT (0Eh/03h): the transport's
/// expected data length does not fit the command.
pub const INVALID_FIELD_IN_IU: Sense = Sense::new(ILLEGAL_REQUEST, 0x0e, 0x03);
/// SAVING PARAMETERS NOT SUPPORTED (39h/00h).
pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(ILLEGAL_REQUEST, 0x39, 0x00);
/// WRITE PROTECTED (27h/00h).
pub const WRITE_PROTECTED: Sense = Sense::new(DATA_PROTECT, 0x27, 0x00);
/// LOGICAL UNIT SOFTWARE WRITE PROTECTED (27h/02h): SWP is set in the
/// Control mode page.
pub const SOFTWARE_WRITE_PROTECTED: Sense = Sense::new(DATA_PROTECT, 0x27, 0x02);
/// SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h): a thin provider is
/// out of room.
pub const SPACE_ALLOC_FAILED: Sense = Sense::new(DATA_PROTECT, 0x27, 0x07);
/// UNRECOVERED READ ERROR (11h/00h).
pub const READ_ERROR: Sense = Sense::new(MEDIUM_ERROR, 0x11, 0x00);
/// WRITE ERROR (0Ch/00h).
pub const WRITE_ERROR: Sense = Sense::new(MEDIUM_ERROR, 0x0c, 0x00);
/// INTERNAL TARGET FAILURE (44h/00h), for failures of non-data commands.
pub const INTERNAL_FAILURE: Sense = Sense::new(HARDWARE_ERROR, 0x44, 0x00);
/// LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE (04h/00h): the provider
/// is gone.
pub const NOT_READY_CAUSE: Sense = Sense::new(NOT_READY, 0x04, 0x00);
/// MISCOMPARE DURING VERIFY OPERATION (1Dh/00h).
pub const MISCOMPARE_VERIFY: Sense = Sense::new(MISCOMPARE, 0x1d, 0x00);
/// NO ADDITIONAL SENSE INFORMATION.
pub const NO_SENSE_INFO: Sense = Sense::new(NO_SENSE, 0x00, 0x00);
/// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h).
pub const UA_RESET: Sense = Sense::new(UNIT_ATTENTION, 0x29, 0x00);
/// BUS DEVICE RESET FUNCTION OCCURRED (29h/03h), after a LUN reset.
pub const UA_LUN_RESET: Sense = Sense::new(UNIT_ATTENTION, 0x29, 0x03);
/// MODE PARAMETERS CHANGED (2Ah/01h).
pub const UA_MODE_CHANGED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x01);
/// RESERVATIONS PREEMPTED (2Ah/03h).
pub const UA_RESERVATIONS_PREEMPTED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x03);
/// RESERVATIONS RELEASED (2Ah/04h).
pub const UA_RESERVATIONS_RELEASED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x04);
/// REGISTRATIONS PREEMPTED (2Ah/05h).
pub const UA_REGISTRATIONS_PREEMPTED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x05);
