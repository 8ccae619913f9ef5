//! Unit tests of the cache over the memory store.
