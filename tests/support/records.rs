//! Re-framing TLS handshake bytes into records, to exercise parsers with a ClientHello split
//! across several records.

/// Frames a handshake message into handshake records (legacy version 3.1, as clients send the
/// ClientHello) of the given fragment sizes; the last record takes the rest.
pub fn handshake_records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = message;
    for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
        if rest.is_empty() {
            break;
        }
        let (fragment, tail) = rest.split_at(size.min(rest.len()));
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(
            &u16::try_from(fragment.len())
                .expect("fragment fits a record")
                .to_be_bytes(),
        );
        out.extend_from_slice(fragment);
        rest = tail;
    }
    out
}
