//! iSCSI PDU formats (RFC 7143 §11): the 48-byte basic header segment
//! (BHS) as a view over bytes with accessors for the fields every PDU
//! has and for those of each opcode, and builders for the PDUs a target
//! sends. All fields are big-endian; the digests are CRC32C stored
//! little-endian (RFC 7143 §13.1, appendix B.4 of RFC 3720).

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;

/// The "no tag" value of an Initiator or Target Transfer Tag.
pub const NO_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes (RFC 7143 §11.1.1).
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TMF_REQ: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQ: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQ: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQ: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RSP: u8 = 0x21;
    /// SCSI Task Management Function Response.
    pub const TMF_RSP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RSP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RSP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RSP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK: u8 = 0x03;
    /// Protocol error.
    pub const PROTOCOL: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Immediate command reject: too many immediate commands.
    pub const IMMEDIATE: u8 = 0x06;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
    /// Long operation reject: out of resources.
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
}

/// Reads a big-endian u32 at `at` (the caller checked the length).
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian u16 at `at`.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Writes a big-endian u32 at `at`.
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u16 at `at`.
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// A received basic header segment. Every accessor reads in place; the
/// array makes the length check once, by type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl Bhs {
    /// The opcode (low six bits of byte 0).
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }

    /// The I bit: an immediate command.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }

    /// Byte 1: the F bit and the opcode's flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }

    /// Length of the additional header segments in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }

    /// Length of the data segment in bytes, without padding.
    pub fn data_len(&self) -> usize {
        (usize::from(self.0[5]) << 16) | (usize::from(self.0[6]) << 8) | usize::from(self.0[7])
    }

    /// Bytes 8..16: the LUN field.
    pub fn lun_field(&self) -> [u8; 8] {
        let mut l = [0; 8];
        l.copy_from_slice(&self.0[8..16]);
        l
    }

    /// The LUN, decoded from peripheral (00b) or flat (01b) single-level
    /// addressing; `None` for other address methods or levels.
    pub fn lun(&self) -> Option<u64> {
        decode_lun(&self.lun_field())
    }

    /// Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        be32(&self.0, 16)
    }

    /// The big-endian u32 at byte `at` (for the opcode-specific fields).
    pub fn u32_at(&self, at: usize) -> u32 {
        be32(&self.0, at)
    }

    /// The big-endian u16 at byte `at`.
    pub fn u16_at(&self, at: usize) -> u16 {
        be16(&self.0, at)
    }

    /// CmdSN (bytes 24..28) of a command PDU.
    pub fn cmd_sn(&self) -> u32 {
        be32(&self.0, 24)
    }
}

/// Decodes a single-level LUN (SAM-5 peripheral or flat addressing).
pub fn decode_lun(l: &[u8; 8]) -> Option<u64> {
    if l[2..].iter().any(|&b| b != 0) {
        return None;
    }
    match l[0] >> 6 {
        0 if l[0] == 0 => Some(u64::from(l[1])),
        1 => Some((u64::from(l[0] & 0x3f) << 8) | u64::from(l[1])),
        _ => None,
    }
}

/// Encodes a LUN as SAM-5 does for REPORT LUNS: peripheral addressing
/// below 256, flat addressing above.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut l = [0; 8];
    if lun < 256 {
        l[1] = lun as u8;
    } else {
        l[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        l[1] = lun as u8;
    }
    l
}

/// Bytes of padding after a data segment of `n` bytes.
pub fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// A BHS to send: opcode and flags, everything else zero.
pub fn header(opcode: u8, flags: u8) -> [u8; BHS_LEN] {
    let mut h = [0u8; BHS_LEN];
    h[0] = opcode;
    h[1] = flags;
    h
}

/// Sets the data segment length of a header being built.
pub fn set_data_len(h: &mut [u8; BHS_LEN], n: usize) {
    let n = n.min(0xff_ffff);
    h[5] = (n >> 16) as u8;
    h[6] = (n >> 8) as u8;
    h[7] = n as u8;
}

/// The sequence numbers every target PDU carries at 24..36.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sn {
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

impl Sn {
    /// Writes StatSN, ExpCmdSN and MaxCmdSN into bytes 24..36.
    pub fn put(&self, h: &mut [u8; BHS_LEN]) {
        put32(h, 24, self.stat_sn);
        put32(h, 28, self.exp_cmd_sn);
        put32(h, 32, self.max_cmd_sn);
    }
}

/// Serial number arithmetic (RFC 1982, 32 bits): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luns_round_trip_in_both_addressings() {
        for lun in [0u64, 1, 255, 256, 4000, 16383] {
            assert_eq!(decode_lun(&encode_lun(lun)), Some(lun));
        }
        assert_eq!(encode_lun(3), [0, 3, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_lun(256), [0x41, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_lun(&[0, 1, 0, 0, 0, 0, 0, 1]), None);
        assert_eq!(decode_lun(&[0x80, 1, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn header_fields_are_where_rfc_7143_puts_them() {
        let mut h = header(op::SCSI_CMD | 0x40, 0x80 | 0x40);
        h[4] = 2;
        set_data_len(&mut h, 0x01_0203);
        h[8..16].copy_from_slice(&encode_lun(5));
        put32(&mut h, 16, 0xdead_beef);
        put32(&mut h, 24, 77);
        let b = Bhs(h);
        assert_eq!(b.opcode(), op::SCSI_CMD);
        assert!(b.immediate());
        assert!(b.final_bit());
        assert_eq!(b.ahs_len(), 8);
        assert_eq!(b.data_len(), 0x01_0203);
        assert_eq!(b.lun(), Some(5));
        assert_eq!(b.itt(), 0xdead_beef);
        assert_eq!(b.cmd_sn(), 77);
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(u32::MAX, 0));
        assert!(!sn_lt(2, 1));
        assert!(sn_le(5, 5));
        assert!(!sn_lt(0, 0x8000_0000));
        assert_eq!(pad(0), 0);
        assert_eq!(pad(1), 3);
        assert_eq!(pad(4), 0);
        assert_eq!(pad(6), 2);
    }
}
