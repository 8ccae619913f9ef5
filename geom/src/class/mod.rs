//! The classes: one file each, readable in one sitting.

pub mod md;
