//! Byte views of the ABI structs: libbpf-rs maps take and return raw bytes.

use weir_datapath_abi as abi;

/// A `#[repr(C)]` type without implicit padding for which every bit pattern is valid.
///
/// # Safety
/// Implementors must have no padding bytes (the ABI crate asserts its layouts) and accept any
/// bit pattern.
pub(crate) unsafe trait Plain: Copy {}

// SAFETY: integers and the ABI structs (explicit padding, layout-checked in the ABI crate).
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for u64 {}
// SAFETY: as above.
unsafe impl Plain for abi::PolicyKey {}
// SAFETY: as above.
unsafe impl Plain for abi::PolicyValue {}
// SAFETY: as above.
unsafe impl Plain for abi::IpcacheKey {}
// SAFETY: as above.
unsafe impl Plain for abi::IpcacheValue {}
// SAFETY: as above.
unsafe impl Plain for abi::EndpointInfo {}
// SAFETY: as above.
unsafe impl Plain for abi::CtKey {}
// SAFETY: as above.
unsafe impl Plain for abi::CtKey4 {}
// SAFETY: as above.
unsafe impl Plain for abi::CtEntry {}
// SAFETY: as above.
unsafe impl Plain for abi::Event {}

/// The bytes of `v`.
pub(crate) fn bytes<T: Plain>(v: &T) -> &[u8] {
    // SAFETY: `T` has no padding, so all `size_of::<T>()` bytes are initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// A `T` read from the front of `b`, if `b` is long enough.
pub(crate) fn read<T: Plain>(b: &[u8]) -> Option<T> {
    if b.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: at least size_of::<T>() readable bytes, and any bit pattern is a valid `T`.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// An LPM trie key: prefix length (host order), then the data.
pub(crate) fn lpm_key<T: Plain>(prefix_len: u32, data: &T) -> Vec<u8> {
    let mut k = prefix_len.to_ne_bytes().to_vec();
    k.extend_from_slice(bytes(data));
    k
}

/// Splits an LPM trie key into prefix length and data.
pub(crate) fn split_lpm_key<T: Plain>(b: &[u8]) -> Option<(u32, T)> {
    let p = read::<u32>(b)?;
    Some((p, read::<T>(b.get(4..)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_key_round_trips() {
        let k = abi::PolicyKey {
            endpoint_id: 7,
            identity: 300,
            direction: 1,
            protocol: 6,
            dport_be: 80u16.to_be(),
        };
        let b = lpm_key(96, &k);
        assert_eq!(b.len(), 16);
        assert_eq!(split_lpm_key::<abi::PolicyKey>(&b), Some((96, k)));
        assert_eq!(split_lpm_key::<abi::PolicyKey>(&b[..10]), None);
    }
}
