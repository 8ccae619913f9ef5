//! NBD wire formats (NBD proto.md): constants, and for each fixed-size
//! message a zero-copy view over a byte buffer, an owned `Repr`, and
//! `parse`/`emit` between them (the smoltcp `wire` pattern).
//!
//! A view is built with `new_checked`, after which no accessor can panic;
//! `new_unchecked` leaves the length check to the caller. All fields are
//! big-endian ("network byte order", proto.md "Conventions").

/// Why a buffer could not be parsed as a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The buffer is shorter than the message.
    Truncated,
    /// The magic number is not the one this message carries.
    BadMagic,
}

/// Result of parsing a message.
pub type Result<T> = core::result::Result<T, WireError>;

// ---- Magic numbers (proto.md "Handshake", "Transmission") ----

/// `NBDMAGIC`, first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the greeting and first word of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- Handshake flags (proto.md "Handshake flags", "Client flags") ----

/// Server handshake flag `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Transmission flags (proto.md "Transmission flags") ----

/// `NBD_FLAG_HAS_FLAGS`: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL`.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_CACHE`.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Options (proto.md "Option types") ----

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

// ---- Option reply types (proto.md "Option reply types") ----

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// `NBD_REP_ERR_PLATFORM`.
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
/// `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// ---- Information types for NBD_REP_INFO (proto.md "NBD_REP_INFO") ----

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Commands and command flags (proto.md "Request types", "Command flags") ----

/// `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// A transmission-phase command type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1).
    Write,
    /// `NBD_CMD_DISC` (2).
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Any other value.
    Unknown(u16),
}

impl From<u16> for Command {
    fn from(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            v => Command::Unknown(v),
        }
    }
}

impl From<Command> for u16 {
    fn from(c: Command) -> u16 {
        match c {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }
}

// ---- Structured reply flags and types (proto.md "Structured reply types") ----

/// `NBD_REPLY_FLAG_DONE`: last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// ---- The `base:allocation` metadata context (proto.md "Metadata querying") ----

/// Name of the `base:allocation` metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `NBD_STATE_HOLE`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// ---- Error values (proto.md "Error values") ----

/// `NBD_EPERM`.
pub const EPERM: u32 = 1;
/// `NBD_EIO`.
pub const EIO: u32 = 5;
/// `NBD_ENOMEM`.
pub const ENOMEM: u32 = 12;
/// `NBD_EINVAL`.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`.
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`.
pub const ESHUTDOWN: u32 = 108;

// ---- Big-endian field helpers; callers have checked the length ----

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn check(buf: &[u8], len: usize) -> Result<()> {
    if buf.len() < len {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

// ======================================================================
// Greeting (proto.md "Newstyle negotiation"): S: NBDMAGIC, IHAVEOPT, u16 flags
// ======================================================================

/// A view of the 18-byte newstyle server greeting.
#[derive(Debug, Clone)]
pub struct GreetingView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> GreetingView<T> {
    /// Length of the greeting.
    pub const LEN: usize = 18;

    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Self {
        GreetingView { buffer }
    }

    /// Wraps a buffer, checking that it holds a whole greeting.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        Ok(v)
    }

    /// Checks the buffer is long enough for every accessor.
    pub fn check_len(&self) -> Result<()> {
        check(self.buffer.as_ref(), Self::LEN)
    }

    /// The first magic (`NBDMAGIC`).
    pub fn magic(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 0)
    }

    /// The second magic (`IHAVEOPT`).
    pub fn option_magic(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 8)
    }

    /// The handshake flags.
    pub fn flags(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 16)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> GreetingView<T> {
    /// Sets both magic numbers.
    pub fn set_magics(&mut self) {
        put_u64(self.buffer.as_mut(), 0, NBDMAGIC);
        put_u64(self.buffer.as_mut(), 8, IHAVEOPT);
    }

    /// Sets the handshake flags.
    pub fn set_flags(&mut self, v: u16) {
        put_u16(self.buffer.as_mut(), 16, v)
    }
}

/// The server greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GreetingRepr {
    /// Handshake flags.
    pub flags: u16,
}

impl GreetingRepr {
    /// Parses a greeting.
    pub fn parse<T: AsRef<[u8]>>(v: &GreetingView<T>) -> Result<Self> {
        v.check_len()?;
        if v.magic() != NBDMAGIC || v.option_magic() != IHAVEOPT {
            return Err(WireError::BadMagic);
        }
        Ok(GreetingRepr { flags: v.flags() })
    }

    /// Bytes needed to emit.
    pub const fn buffer_len(&self) -> usize {
        GreetingView::<&[u8]>::LEN
    }

    /// Writes the greeting into a view of at least `buffer_len` bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut GreetingView<T>) {
        v.set_magics();
        v.set_flags(self.flags);
    }
}

// ======================================================================
// Option header (proto.md "Newstyle negotiation"):
// C: u64 IHAVEOPT, u32 option, u32 length, then `length` bytes of data
// ======================================================================

/// A view of the 16-byte header of a client option.
#[derive(Debug, Clone)]
pub struct OptionView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> OptionView<T> {
    /// Length of the header.
    pub const LEN: usize = 16;

    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Self {
        OptionView { buffer }
    }

    /// Wraps a buffer, checking that it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        Ok(v)
    }

    /// Checks the buffer is long enough for every accessor.
    pub fn check_len(&self) -> Result<()> {
        check(self.buffer.as_ref(), Self::LEN)
    }

    /// The magic (`IHAVEOPT`).
    pub fn magic(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 0)
    }

    /// The option code.
    pub fn option(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 8)
    }

    /// Length of the option data that follows.
    pub fn length(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 12)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> OptionView<T> {
    /// Sets the magic.
    pub fn set_magic(&mut self, v: u64) {
        put_u64(self.buffer.as_mut(), 0, v)
    }

    /// Sets the option code.
    pub fn set_option(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 8, v)
    }

    /// Sets the data length.
    pub fn set_length(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 12, v)
    }
}

/// A client option header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionRepr {
    /// Option code (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the data that follows the header.
    pub length: u32,
}

impl OptionRepr {
    /// Parses an option header.
    pub fn parse<T: AsRef<[u8]>>(v: &OptionView<T>) -> Result<Self> {
        v.check_len()?;
        if v.magic() != IHAVEOPT {
            return Err(WireError::BadMagic);
        }
        Ok(OptionRepr {
            option: v.option(),
            length: v.length(),
        })
    }

    /// Bytes needed to emit.
    pub const fn buffer_len(&self) -> usize {
        OptionView::<&[u8]>::LEN
    }

    /// Writes the header into a view of at least `buffer_len` bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut OptionView<T>) {
        v.set_magic(IHAVEOPT);
        v.set_option(self.option);
        v.set_length(self.length);
    }
}

// ======================================================================
// Option reply header (proto.md "Fixed newstyle negotiation"):
// S: u64 0x3e889045565a9, u32 option, u32 reply type, u32 length, data
// ======================================================================

/// A view of the 20-byte header of an option reply.
#[derive(Debug, Clone)]
pub struct OptionReplyView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> OptionReplyView<T> {
    /// Length of the header.
    pub const LEN: usize = 20;

    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Self {
        OptionReplyView { buffer }
    }

    /// Wraps a buffer, checking that it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        Ok(v)
    }

    /// Checks the buffer is long enough for every accessor.
    pub fn check_len(&self) -> Result<()> {
        check(self.buffer.as_ref(), Self::LEN)
    }

    /// The magic.
    pub fn magic(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 0)
    }

    /// The option this replies to.
    pub fn option(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 8)
    }

    /// The reply type (`NBD_REP_*`).
    pub fn reply_type(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 12)
    }

    /// Length of the reply data that follows.
    pub fn length(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 16)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> OptionReplyView<T> {
    /// Sets the magic.
    pub fn set_magic(&mut self, v: u64) {
        put_u64(self.buffer.as_mut(), 0, v)
    }

    /// Sets the option replied to.
    pub fn set_option(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 8, v)
    }

    /// Sets the reply type.
    pub fn set_reply_type(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 12, v)
    }

    /// Sets the data length.
    pub fn set_length(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 16, v)
    }
}

/// An option reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyRepr {
    /// The option replied to.
    pub option: u32,
    /// Reply type (`NBD_REP_*`).
    pub reply_type: u32,
    /// Length of the data that follows the header.
    pub length: u32,
}

impl OptionReplyRepr {
    /// Parses an option reply header.
    pub fn parse<T: AsRef<[u8]>>(v: &OptionReplyView<T>) -> Result<Self> {
        v.check_len()?;
        if v.magic() != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic);
        }
        Ok(OptionReplyRepr {
            option: v.option(),
            reply_type: v.reply_type(),
            length: v.length(),
        })
    }

    /// Bytes needed to emit.
    pub const fn buffer_len(&self) -> usize {
        OptionReplyView::<&[u8]>::LEN
    }

    /// Writes the header into a view of at least `buffer_len` bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut OptionReplyView<T>) {
        v.set_magic(OPTION_REPLY_MAGIC);
        v.set_option(self.option);
        v.set_reply_type(self.reply_type);
        v.set_length(self.length);
    }
}

// ======================================================================
// Reply to NBD_OPT_EXPORT_NAME (proto.md "Newstyle negotiation"):
// S: u64 size, u16 transmission flags, 124 zero bytes unless NO_ZEROES
// ======================================================================

/// Length of the reply to `NBD_OPT_EXPORT_NAME` without the zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Length of the zero padding after it (unless `NBD_FLAG_C_NO_ZEROES`).
pub const EXPORT_NAME_ZEROES: usize = 124;

/// The reply to `NBD_OPT_EXPORT_NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReplyRepr {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// True to append the 124 reserved zero bytes.
    pub zeroes: bool,
}

impl ExportNameReplyRepr {
    /// Parses a reply; `zeroes` tells whether the padding is expected.
    pub fn parse(buf: &[u8], zeroes: bool) -> Result<Self> {
        let r = ExportNameReplyRepr {
            size: 0,
            flags: 0,
            zeroes,
        };
        check(buf, r.buffer_len())?;
        Ok(ExportNameReplyRepr {
            size: get_u64(buf, 0),
            flags: get_u16(buf, 8),
            zeroes,
        })
    }

    /// Bytes needed to emit.
    pub const fn buffer_len(&self) -> usize {
        if self.zeroes {
            EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES
        } else {
            EXPORT_NAME_REPLY_LEN
        }
    }

    /// Writes the reply into the first `buffer_len` bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.size);
        put_u16(buf, 8, self.flags);
        buf[EXPORT_NAME_REPLY_LEN..self.buffer_len()].fill(0);
    }
}

// ======================================================================
// Request (proto.md "Request message"), 28 bytes:
// C: u32 magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length
// ======================================================================

/// A view of a 28-byte transmission request header.
#[derive(Debug, Clone)]
pub struct RequestView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> RequestView<T> {
    /// Length of the header.
    pub const LEN: usize = 28;

    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Self {
        RequestView { buffer }
    }

    /// Wraps a buffer, checking that it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        Ok(v)
    }

    /// Checks the buffer is long enough for every accessor.
    pub fn check_len(&self) -> Result<()> {
        check(self.buffer.as_ref(), Self::LEN)
    }

    /// The magic (`NBD_REQUEST_MAGIC`).
    pub fn magic(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 0)
    }

    /// Command flags.
    pub fn flags(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 4)
    }

    /// Command type.
    pub fn command(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 6)
    }

    /// The client's cookie (formerly "handle").
    pub fn cookie(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 8)
    }

    /// Byte offset into the export.
    pub fn offset(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 16)
    }

    /// Length in bytes.
    pub fn length(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 24)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> RequestView<T> {
    /// Sets the magic.
    pub fn set_magic(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 0, v)
    }

    /// Sets the command flags.
    pub fn set_flags(&mut self, v: u16) {
        put_u16(self.buffer.as_mut(), 4, v)
    }

    /// Sets the command type.
    pub fn set_command(&mut self, v: u16) {
        put_u16(self.buffer.as_mut(), 6, v)
    }

    /// Sets the cookie.
    pub fn set_cookie(&mut self, v: u64) {
        put_u64(self.buffer.as_mut(), 8, v)
    }

    /// Sets the offset.
    pub fn set_offset(&mut self, v: u64) {
        put_u64(self.buffer.as_mut(), 16, v)
    }

    /// Sets the length.
    pub fn set_length(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 24, v)
    }
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRepr {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (of the payload, for a write).
    pub length: u32,
}

impl RequestRepr {
    /// Parses a request header.
    pub fn parse<T: AsRef<[u8]>>(v: &RequestView<T>) -> Result<Self> {
        v.check_len()?;
        if v.magic() != REQUEST_MAGIC {
            return Err(WireError::BadMagic);
        }
        Ok(RequestRepr {
            flags: v.flags(),
            command: Command::from(v.command()),
            cookie: v.cookie(),
            offset: v.offset(),
            length: v.length(),
        })
    }

    /// Bytes needed to emit.
    pub const fn buffer_len(&self) -> usize {
        RequestView::<&[u8]>::LEN
    }

    /// Writes the header into a view of at least `buffer_len` bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut RequestView<T>) {
        v.set_magic(REQUEST_MAGIC);
        v.set_flags(self.flags);
        v.set_command(self.command.into());
        v.set_cookie(self.cookie);
        v.set_offset(self.offset);
        v.set_length(self.length);
    }
}

// ======================================================================
// Simple reply (proto.md "Simple reply message"), 16 bytes:
// S: u32 magic, u32 error, u64 cookie
// ======================================================================

/// A view of a 16-byte simple reply.
#[derive(Debug, Clone)]
pub struct SimpleReplyView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SimpleReplyView<T> {
    /// Length of the reply header.
    pub const LEN: usize = 16;

    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Self {
        SimpleReplyView { buffer }
    }

    /// Wraps a buffer, checking that it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        Ok(v)
    }

    /// Checks the buffer is long enough for every accessor.
    pub fn check_len(&self) -> Result<()> {
        check(self.buffer.as_ref(), Self::LEN)
    }

    /// The magic (`NBD_SIMPLE_REPLY_MAGIC`).
    pub fn magic(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 0)
    }

    /// The error value (0 for success).
    pub fn error(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 4)
    }

    /// The cookie of the request replied to.
    pub fn cookie(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 8)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SimpleReplyView<T> {
    /// Sets the magic.
    pub fn set_magic(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 0, v)
    }

    /// Sets the error value.
    pub fn set_error(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 4, v)
    }

    /// Sets the cookie.
    pub fn set_cookie(&mut self, v: u64) {
        put_u64(self.buffer.as_mut(), 8, v)
    }
}

/// A simple reply header (read data, if any, follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReplyRepr {
    /// Error value (`NBD_E*`), 0 for success.
    pub error: u32,
    /// Cookie of the request replied to.
    pub cookie: u64,
}

impl SimpleReplyRepr {
    /// Parses a simple reply header.
    pub fn parse<T: AsRef<[u8]>>(v: &SimpleReplyView<T>) -> Result<Self> {
        v.check_len()?;
        if v.magic() != SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic);
        }
        Ok(SimpleReplyRepr {
            error: v.error(),
            cookie: v.cookie(),
        })
    }

    /// Bytes needed to emit.
    pub const fn buffer_len(&self) -> usize {
        SimpleReplyView::<&[u8]>::LEN
    }

    /// Writes the header into a view of at least `buffer_len` bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut SimpleReplyView<T>) {
        v.set_magic(SIMPLE_REPLY_MAGIC);
        v.set_error(self.error);
        v.set_cookie(self.cookie);
    }
}

// ======================================================================
// Structured reply chunk header (proto.md "Structured reply chunk message"),
// 20 bytes: S: u32 magic, u16 flags, u16 type, u64 cookie, u32 length
// ======================================================================

/// A view of a 20-byte structured reply chunk header.
#[derive(Debug, Clone)]
pub struct ChunkView<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ChunkView<T> {
    /// Length of the chunk header.
    pub const LEN: usize = 20;

    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Self {
        ChunkView { buffer }
    }

    /// Wraps a buffer, checking that it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        Ok(v)
    }

    /// Checks the buffer is long enough for every accessor.
    pub fn check_len(&self) -> Result<()> {
        check(self.buffer.as_ref(), Self::LEN)
    }

    /// The magic (`NBD_STRUCTURED_REPLY_MAGIC`).
    pub fn magic(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 0)
    }

    /// Reply flags (`NBD_REPLY_FLAG_*`).
    pub fn flags(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 4)
    }

    /// Chunk type (`NBD_REPLY_TYPE_*`).
    pub fn chunk_type(&self) -> u16 {
        get_u16(self.buffer.as_ref(), 6)
    }

    /// The cookie of the request replied to.
    pub fn cookie(&self) -> u64 {
        get_u64(self.buffer.as_ref(), 8)
    }

    /// Length of the payload that follows.
    pub fn length(&self) -> u32 {
        get_u32(self.buffer.as_ref(), 16)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ChunkView<T> {
    /// Sets the magic.
    pub fn set_magic(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 0, v)
    }

    /// Sets the reply flags.
    pub fn set_flags(&mut self, v: u16) {
        put_u16(self.buffer.as_mut(), 4, v)
    }

    /// Sets the chunk type.
    pub fn set_chunk_type(&mut self, v: u16) {
        put_u16(self.buffer.as_mut(), 6, v)
    }

    /// Sets the cookie.
    pub fn set_cookie(&mut self, v: u64) {
        put_u64(self.buffer.as_mut(), 8, v)
    }

    /// Sets the payload length.
    pub fn set_length(&mut self, v: u32) {
        put_u32(self.buffer.as_mut(), 16, v)
    }
}

/// A structured reply chunk header (its payload follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRepr {
    /// Reply flags (`NBD_REPLY_FLAG_*`).
    pub flags: u16,
    /// Chunk type (`NBD_REPLY_TYPE_*`).
    pub chunk_type: u16,
    /// Cookie of the request replied to.
    pub cookie: u64,
    /// Payload length in bytes.
    pub length: u32,
}

impl ChunkRepr {
    /// Parses a chunk header.
    pub fn parse<T: AsRef<[u8]>>(v: &ChunkView<T>) -> Result<Self> {
        v.check_len()?;
        if v.magic() != STRUCTURED_REPLY_MAGIC {
            return Err(WireError::BadMagic);
        }
        Ok(ChunkRepr {
            flags: v.flags(),
            chunk_type: v.chunk_type(),
            cookie: v.cookie(),
            length: v.length(),
        })
    }

    /// Bytes needed to emit.
    pub const fn buffer_len(&self) -> usize {
        ChunkView::<&[u8]>::LEN
    }

    /// Writes the header into a view of at least `buffer_len` bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, v: &mut ChunkView<T>) {
        v.set_magic(STRUCTURED_REPLY_MAGIC);
        v.set_flags(self.flags);
        v.set_chunk_type(self.chunk_type);
        v.set_cookie(self.cookie);
        v.set_length(self.length);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        let bytes: [u8; 18] = [
            b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
            b'P', b'T', 0x00, 0x03,
        ];
        let repr = GreetingRepr::parse(&GreetingView::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(repr.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut out = [0u8; 18];
        repr.emit(&mut GreetingView::new_unchecked(&mut out[..]));
        assert_eq!(out, bytes);
        assert_eq!(
            GreetingView::new_checked(&bytes[..17]).unwrap_err(),
            WireError::Truncated
        );
        let mut bad = bytes;
        bad[0] = b'X';
        assert_eq!(
            GreetingRepr::parse(&GreetingView::new_unchecked(&bad[..])),
            Err(WireError::BadMagic)
        );
    }

    #[test]
    fn option_header_bytes() {
        let bytes: [u8; 16] = [
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
            0x00, 0x00, 0x00, 0x07, // NBD_OPT_GO
            0x00, 0x00, 0x00, 0x0a, // length 10
        ];
        let v = OptionView::new_checked(&bytes[..]).unwrap();
        let repr = OptionRepr::parse(&v).unwrap();
        assert_eq!(
            repr,
            OptionRepr {
                option: OPT_GO,
                length: 10
            }
        );
        let mut out = [0xffu8; 16];
        repr.emit(&mut OptionView::new_unchecked(&mut out[..]));
        assert_eq!(out, bytes);
        assert_eq!(
            OptionView::new_checked(&bytes[..15]).unwrap_err(),
            WireError::Truncated
        );
        let mut bad = bytes;
        bad[7] ^= 1;
        assert_eq!(
            OptionRepr::parse(&OptionView::new_unchecked(&bad[..])),
            Err(WireError::BadMagic)
        );
    }

    #[test]
    fn option_reply_header_bytes() {
        let bytes: [u8; 20] = [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // reply magic
            0x00, 0x00, 0x00, 0x03, // NBD_OPT_LIST
            0x80, 0x00, 0x00, 0x01, // NBD_REP_ERR_UNSUP
            0x00, 0x00, 0x01, 0x00, // length 256
        ];
        let repr =
            OptionReplyRepr::parse(&OptionReplyView::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(
            repr,
            OptionReplyRepr {
                option: OPT_LIST,
                reply_type: REP_ERR_UNSUP,
                length: 256
            }
        );
        let mut out = [0u8; 20];
        repr.emit(&mut OptionReplyView::new_unchecked(&mut out[..]));
        assert_eq!(out, bytes);
        assert_eq!(
            OptionReplyView::new_checked(&bytes[..19]).unwrap_err(),
            WireError::Truncated
        );
    }

    #[test]
    fn export_name_reply_bytes() {
        let r = ExportNameReplyRepr {
            size: 0x0102_0304_0506_0708,
            flags: 0x0143,
            zeroes: false,
        };
        let mut out = [0xaau8; 10];
        r.emit(&mut out);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8, 0x01, 0x43]);
        assert_eq!(ExportNameReplyRepr::parse(&out, false), Ok(r));
        let z = ExportNameReplyRepr { zeroes: true, ..r };
        let mut long = [0xaau8; 134];
        z.emit(&mut long);
        assert_eq!(&long[..10], &out);
        assert!(long[10..].iter().all(|&b| b == 0));
        assert_eq!(
            ExportNameReplyRepr::parse(&out, true),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn request_bytes() {
        let bytes: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // FUA
            0x00, 0x01, // NBD_CMD_WRITE
            0xde, 0xad, 0xbe, 0xef, 0x00, 0x00, 0x00, 0x01, // cookie
            0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, // offset 1 MiB
            0x00, 0x00, 0x10, 0x00, // length 4096
        ];
        let v = RequestView::new_checked(&bytes[..]).unwrap();
        assert_eq!(v.command(), 1);
        let repr = RequestRepr::parse(&v).unwrap();
        assert_eq!(
            repr,
            RequestRepr {
                flags: CMD_FLAG_FUA,
                command: Command::Write,
                cookie: 0xdead_beef_0000_0001,
                offset: 1 << 20,
                length: 4096
            }
        );
        let mut out = [0u8; 28];
        repr.emit(&mut RequestView::new_unchecked(&mut out[..]));
        assert_eq!(out, bytes);
        assert_eq!(
            RequestView::new_checked(&bytes[..27]).unwrap_err(),
            WireError::Truncated
        );
        let mut bad = bytes;
        bad[3] = 0x14;
        assert_eq!(
            RequestRepr::parse(&RequestView::new_unchecked(&bad[..])),
            Err(WireError::BadMagic)
        );
    }

    #[test]
    fn command_codes_round_trip() {
        for v in 0..=20u16 {
            assert_eq!(u16::from(Command::from(v)), v);
        }
        assert_eq!(Command::from(6), Command::WriteZeroes);
        assert_eq!(Command::from(9), Command::Unknown(9));
    }

    #[test]
    fn simple_reply_bytes() {
        let bytes: [u8; 16] = [
            0x67, 0x44, 0x66, 0x98, // magic
            0x00, 0x00, 0x00, 0x16, // EINVAL
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, // cookie 42
        ];
        let repr =
            SimpleReplyRepr::parse(&SimpleReplyView::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(
            repr,
            SimpleReplyRepr {
                error: EINVAL,
                cookie: 42
            }
        );
        let mut out = [0u8; 16];
        repr.emit(&mut SimpleReplyView::new_unchecked(&mut out[..]));
        assert_eq!(out, bytes);
        assert_eq!(
            SimpleReplyView::new_checked(&bytes[..15]).unwrap_err(),
            WireError::Truncated
        );
    }

    #[test]
    fn chunk_bytes() {
        let bytes: [u8; 20] = [
            0x66, 0x8e, 0x33, 0xef, // magic
            0x00, 0x01, // DONE
            0x00, 0x01, // OFFSET_DATA
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, // cookie 7
            0x00, 0x00, 0x02, 0x08, // length 8 + 512
        ];
        let repr = ChunkRepr::parse(&ChunkView::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(
            repr,
            ChunkRepr {
                flags: REPLY_FLAG_DONE,
                chunk_type: REPLY_TYPE_OFFSET_DATA,
                cookie: 7,
                length: 520
            }
        );
        let mut out = [0u8; 20];
        repr.emit(&mut ChunkView::new_unchecked(&mut out[..]));
        assert_eq!(out, bytes);
        assert_eq!(
            ChunkView::new_checked(&bytes[..19]).unwrap_err(),
            WireError::Truncated
        );
        let mut bad = bytes;
        bad[0] = 0x67;
        assert_eq!(
            ChunkRepr::parse(&ChunkView::new_unchecked(&bad[..])),
            Err(WireError::BadMagic)
        );
    }
}
