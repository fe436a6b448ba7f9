//! `x-mock-gzip`: a provider that compresses its response although it was asked for
//! `accept-encoding: identity`. The body is a valid gzip member (RFC 1952) whose deflate data
//! uses stored blocks only (RFC 1951 §3.2.4): any client inflates it, and the mock needs no
//! compression library.

/// CRC-32 (IEEE 802.3, reflected, as gzip uses), bit by bit: the mock's bodies are small.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

pub(crate) fn gzip_stored(data: &[u8]) -> Vec<u8> {
    // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=unknown.
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut blocks = data.chunks(0xffff).peekable();
    if blocks.peek().is_none() {
        out.extend([1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        let last = blocks.peek().is_none();
        let len = block.len() as u16;
        out.push(u8::from(last)); // BFINAL, BTYPE=00 (stored)
        out.extend(len.to_le_bytes());
        out.extend((!len).to_le_bytes());
        out.extend(block);
    }
    out.extend(crc32(data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_of_the_standard_check_string() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn stored_blocks_frame_the_data() {
        let data = vec![7u8; 70_000];
        let z = gzip_stored(&data);
        assert_eq!(&z[..3], &[0x1f, 0x8b, 8]);
        // Two blocks: 65535 bytes (not final), then 4465 (final).
        assert_eq!(z[10], 0);
        assert_eq!(&z[11..15], &[0xff, 0xff, 0, 0]);
        let second = 15 + 0xffff;
        assert_eq!(z[second], 1);
        assert_eq!(u16::from_le_bytes([z[second + 1], z[second + 2]]), 4465);
        assert_eq!(z.len(), 10 + 2 * 5 + 70_000 + 8);
        assert_eq!(&z[z.len() - 4..], &70_000u32.to_le_bytes());
        assert_eq!(gzip_stored(b"").len(), 10 + 5 + 8);
    }
}
