//! Turns normalised rules and identities into per-endpoint [`MapState`]: the entries of the
//! kernel policy map, keyed exactly as the datapath keys them, each remembering the rules that
//! produced it. [`decide`] mirrors the kernel lookup and is the oracle for datapath tests.

mod mapstate;

pub use mapstate::*;
