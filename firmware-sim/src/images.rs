//! Small, real images made on the fly for proof of delivery: a signature (grayscale PNG)
//! and a doorstep photo (baseline grayscale JPEG). No image crate: both encoders are a few
//! dozen lines and pinned by tests.
//!
//! ```text
//! PNG  = signature(8) IHDR(w, h, depth 8, gray) IDAT(zlib: stored deflate blocks) IEND
//!        each chunk = len: u32 BE ++ type(4) ++ data ++ crc32(type ++ data): u32 BE
//! JPEG = SOI APP0(JFIF) DQT(all 1) SOF0(1 component, 8x8 blocks) DHT(DC: standard
//!        luminance table; AC: one code, EOB) SOS scan EOI
//!        every block carries only its DC coefficient (the block's mean), so the photo
//!        is a mosaic of flat 8x8 squares: tiny, and any decoder shows it.
//! ```

use rand::{Rng, SeedableRng};

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
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

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit grayscale PNG of `w` x `h` pixels (row-major, `pixels.len() == w * h`).
pub fn png_gray(w: u32, h: u32, pixels: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(pixels.len() + h as usize);
    for row in pixels.chunks(w.max(1) as usize) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    // zlib stream of stored (uncompressed) deflate blocks.
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &z);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A handwritten-looking signature: a dark scribble on white, 160 x 60.
pub fn signature_png(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (w, h) = (160usize, 60usize);
    let mut px = vec![255u8; w * h];
    let (p1, p2): (f64, f64) = (rng.random_range(0.0..6.3), rng.random_range(0.0..6.3));
    let (a1, a2): (f64, f64) = (rng.random_range(8.0..16.0), rng.random_range(2.0..6.0));
    for x in 12..148 {
        let xf = x as f64;
        let y = 30.0 + a1 * (xf / 9.0 + p1).sin() + a2 * (xf / 3.5 + p2).sin();
        for dy in -1..=1 {
            let yy = (y.round() as i64 + dy).clamp(0, h as i64 - 1) as usize;
            px[yy * w + x] = 20;
        }
    }
    png_gray(w as u32, h as u32, &px)
}

/// Bit writer of a JPEG entropy-coded segment (0xFF bytes stuffed with 0x00).
struct Bits {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl Bits {
    fn put(&mut self, code: u32, len: u32) {
        for i in (0..len).rev() {
            self.acc = (self.acc << 1) | ((code >> i) & 1);
            self.n += 1;
            if self.n == 8 {
                let b = self.acc as u8;
                self.out.push(b);
                if b == 0xFF {
                    self.out.push(0);
                }
                self.acc = 0;
                self.n = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        while self.n != 0 {
            self.put(1, 1);
        }
        self.out
    }
}

/// Standard luminance DC table (JPEG Annex K.3): code counts by length, then symbols.
const DC_BITS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
const DC_VALS: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];

/// Canonical Huffman codes (code, length) for symbols `0..=11` of the DC table.
fn dc_codes() -> [(u32, u32); 12] {
    let mut codes = [(0u32, 0u32); 12];
    let (mut code, mut k) = (0u32, 0usize);
    for (i, &count) in DC_BITS.iter().enumerate() {
        for _ in 0..count {
            codes[DC_VALS[k] as usize] = (code, i as u32 + 1);
            code += 1;
            k += 1;
        }
        code <<= 1;
    }
    codes
}

fn segment(out: &mut Vec<u8>, marker: u8, data: &[u8]) {
    out.extend_from_slice(&[0xFF, marker]);
    out.extend_from_slice(&((data.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// A baseline grayscale JPEG of `w` x `h` pixels (both multiples of 8), one flat value per
/// 8x8 block: `blocks[by * (w / 8) + bx]`.
pub fn jpeg_blocks(w: u16, h: u16, blocks: &[u8]) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    segment(&mut out, 0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
    let mut dqt = vec![0u8];
    dqt.extend_from_slice(&[1u8; 64]);
    segment(&mut out, 0xDB, &dqt);
    let mut sof = vec![8];
    sof.extend_from_slice(&h.to_be_bytes());
    sof.extend_from_slice(&w.to_be_bytes());
    sof.extend_from_slice(&[1, 1, 0x11, 0]);
    segment(&mut out, 0xC0, &sof);
    let mut dht = vec![0x00];
    dht.extend_from_slice(&DC_BITS);
    dht.extend_from_slice(&DC_VALS);
    // AC table 0: a single 1-bit code "0" for EOB.
    dht.push(0x10);
    dht.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    dht.push(0x00);
    segment(&mut out, 0xC4, &dht);
    segment(&mut out, 0xDA, &[1, 1, 0x00, 0, 63, 0]);
    let codes = dc_codes();
    let mut bits = Bits {
        out: Vec::new(),
        acc: 0,
        n: 0,
    };
    let mut pred = 0i32;
    let n_blocks = usize::from(w / 8) * usize::from(h / 8);
    for i in 0..n_blocks {
        let v = i32::from(blocks.get(i).copied().unwrap_or(128));
        // DCT DC of a flat block = 8 * (value - 128); the quantizer is 1.
        let dc = 8 * (v - 128);
        let diff = dc - pred;
        pred = dc;
        let cat = 32 - diff.unsigned_abs().leading_zeros();
        let (code, len) = codes[cat as usize];
        bits.put(code, len);
        if cat > 0 {
            let extra = if diff < 0 { diff - 1 } else { diff };
            bits.put((extra as u32) & ((1 << cat) - 1), cat);
        }
        bits.put(0, 1); // EOB
    }
    out.extend_from_slice(&bits.finish());
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// A doorstep photo: a parcel (light box) in front of a door, with some noise, 160 x 120.
pub fn photo_jpeg(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (bw, bh) = (20usize, 15usize);
    let box_x = rng.random_range(3..10);
    let mut blocks = Vec::with_capacity(bw * bh);
    for by in 0..bh {
        for bx in 0..bw {
            let wall = 90 + (by * 3) as i32;
            let door = (12..18).contains(&bx) && by >= 2;
            let parcel = (box_x..box_x + 6).contains(&bx) && by >= 9;
            let base = if parcel {
                200
            } else if door {
                60
            } else {
                wall
            };
            let v = base + rng.random_range(-6..=6);
            blocks.push(v.clamp(0, 255) as u8);
        }
    }
    jpeg_blocks((bw * 8) as u16, (bh * 8) as u16, &blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn png_has_signature_and_valid_chunks() {
        let p = signature_png(3);
        assert!(p.starts_with(b"\x89PNG\r\n\x1a\n"));
        let mut i = 8;
        let mut kinds = Vec::new();
        while i < p.len() {
            let len = u32::from_be_bytes(p[i..i + 4].try_into().unwrap()) as usize;
            let body = &p[i + 4..i + 8 + len];
            let crc = u32::from_be_bytes(p[i + 8 + len..i + 12 + len].try_into().unwrap());
            assert_eq!(crc, crc32(body));
            kinds.push(String::from_utf8(body[..4].to_vec()).unwrap());
            i += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        assert_ne!(signature_png(3), signature_png(4));
    }

    #[test]
    fn jpeg_is_framed_and_stuffed() {
        let j = photo_jpeg(5);
        assert!(j.starts_with(&[0xFF, 0xD8, 0xFF, 0xE0]));
        assert!(j.ends_with(&[0xFF, 0xD9]));
        // Extreme jumps between blocks use the longest DC codes.
        let j = jpeg_blocks(16, 8, &[0, 255]);
        assert!(j.ends_with(&[0xFF, 0xD9]));
    }

    /// Writes samples for a real decoder: `SIM_IMAGES_DIR=/tmp/x cargo test -p
    /// fleetsync-sim -- --ignored images`, then e.g. `identify /tmp/x/*`.
    #[test]
    #[ignore = "writes files for a manual check with an image decoder"]
    fn images_write_samples() {
        let dir = std::path::PathBuf::from(std::env::var("SIM_IMAGES_DIR").unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("signature.png"), signature_png(1)).unwrap();
        std::fs::write(dir.join("photo.jpg"), photo_jpeg(1)).unwrap();
        std::fs::write(dir.join("extremes.jpg"), jpeg_blocks(16, 8, &[0, 255])).unwrap();
    }
}
