//! Buffer cache as a library: instances over a backing-store trait.
//!
//! Each user (raid5 stripes, gbde key sectors, read caches) creates its own
//! instance with its own backing-store methods; there is no global cache.
//! The first users arrive with the raid5 and gbde classes.
#![no_std]
#![forbid(unsafe_code)]
