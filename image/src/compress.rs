//! Layer compression: choosing, detecting, compressing (in parallel, deterministically)
//! and decompressing.

use std::io::{self, BufReader, Read, Write};

use gzp::ZWriter;
use gzp::deflate::Gzip;
use gzp::par::compress::{ParCompress, ParCompressBuilder};
use oci_spec::image::MediaType;

use crate::error::{Error, Result};

/// gzp block size. Part of the determinism contract: the gzip bytes of a layer depend on
/// it, so it must never depend on the machine. Blocks are compressed independently.
const GZIP_BLOCK: usize = 1 << 20;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// gzip at `level` 0..=9 (`...tar+gzip`); the default, level 6.
    Gzip {
        /// Compression level, 0..=9.
        level: u32,
    },
    /// zstd at `level` 1..=22 (`...tar+zstd`).
    Zstd {
        /// Compression level, 1..=22.
        level: i32,
    },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Gzip { level: 6 }
    }
}

impl Compression {
    /// gzip at the default level 6.
    pub const fn gzip() -> Self {
        Compression::Gzip { level: 6 }
    }

    /// zstd at the default level 3.
    pub const fn zstd() -> Self {
        Compression::Zstd { level: 3 }
    }

    /// The OCI media type of a layer compressed this way.
    pub fn layer_media_type(&self) -> MediaType {
        match self {
            Compression::None => MediaType::ImageLayer,
            Compression::Gzip { .. } => MediaType::ImageLayerGzip,
            Compression::Zstd { .. } => MediaType::ImageLayerZstd,
        }
    }
}

/// A compression a user named that farm does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown compression '{0}': use gzip, zstd or none, optionally with a level (gzip:9, zstd:19)"
)]
pub struct UnknownCompression(pub String);

impl std::str::FromStr for Compression {
    type Err = UnknownCompression;

    /// `gzip`, `zstd` or `none`, optionally with `:LEVEL` (gzip 0..=9, zstd 1..=22).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || UnknownCompression(s.to_string());
        let (kind, level) = match s.split_once(':') {
            Some((k, l)) => (k, Some(l)),
            None => (s, None),
        };
        match (kind, level) {
            ("gzip", None) => Ok(Compression::gzip()),
            ("gzip", Some(l)) => match l.parse() {
                Ok(level @ 0..=9) => Ok(Compression::Gzip { level }),
                _ => Err(bad()),
            },
            ("zstd", None) => Ok(Compression::zstd()),
            ("zstd", Some(l)) => match l.parse() {
                Ok(level @ 1..=22) => Ok(Compression::Zstd { level }),
                _ => Err(bad()),
            },
            ("none", None) => Ok(Compression::None),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Compression {
    /// The form `from_str` reads; default levels are left out (`gzip`, `zstd`), so the
    /// words users write are the words cache keys hold.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Compression::None => f.write_str("none"),
            Compression::Gzip { level: 6 } => f.write_str("gzip"),
            Compression::Gzip { level } => write!(f, "gzip:{level}"),
            Compression::Zstd { level: 3 } => f.write_str("zstd"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl serde::Serialize for Compression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Compression {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a byte stream starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Anything that is not recognised as compressed (a tar, presumably).
    Plain,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

/// Recognise the compression of a stream from its first bytes. Formats farm does not
/// read (xz, bzip2) are an error rather than being mistaken for a tar.
pub fn detect(head: &[u8]) -> Result<Format> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Format::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Format::Zstd)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Err(Error::UnsupportedCompression("xz"))
    } else if head.starts_with(b"BZh") && head.len() >= 4 && head[3].is_ascii_digit() {
        Err(Error::UnsupportedCompression("bzip2"))
    } else {
        Ok(Format::Plain)
    }
}

/// Wrap `input` so that reading it yields the decompressed bytes, whatever the input's
/// compression (plain, gzip including multi-member, zstd), detected by magic bytes.
pub fn decompress<'a, R: Read + Send + 'a>(input: R) -> Result<Box<dyn Read + Send + 'a>> {
    let mut input = input;
    // Read the first bytes ourselves: a pipe may deliver fewer than asked for.
    let mut head = [0u8; 6];
    let mut n = 0;
    while n < head.len() {
        match input.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Io {
                    context: "reading layer stream".into(),
                    source,
                });
            }
        }
    }
    let head = &head[..n];
    let buf = BufReader::with_capacity(256 * 1024, io::Cursor::new(head.to_vec()).chain(input));
    Ok(match detect(head)? {
        Format::Plain => Box::new(buf),
        Format::Gzip => Box::new(BufReader::with_capacity(
            256 * 1024,
            flate2::bufread::MultiGzDecoder::new(buf),
        )),
        Format::Zstd => {
            let mut d =
                zstd::stream::read::Decoder::with_buffer(buf).map_err(|source| Error::Io {
                    context: "starting zstd decoder".into(),
                    source,
                })?;
            // Layers may use long windows (zstd --long); allow up to 2 GiB.
            d.window_log_max(31).map_err(|source| Error::Io {
                context: "configuring zstd decoder".into(),
                source,
            })?;
            Box::new(d)
        }
    })
}

/// A streaming compressor writing into `W`. Output is deterministic: the same input
/// bytes give the same output bytes whatever the write sizes and thread count.
///
/// `flush` is a no-op on purpose (flushing would cut a compression block at an
/// arbitrary place); call [`Compressor::finish`] at the end.
pub struct Compressor<W: Write + Send + 'static> {
    inner: Option<Inner<W>>,
}

enum Inner<W: Write + Send + 'static> {
    None(W),
    Gzip(ParCompress<'static, Gzip, W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write + Send + 'static> Compressor<W> {
    /// Start compressing into `out` with `threads` worker threads (at least 1).
    ///
    /// gzip uses gzp (independent 1 MiB blocks compressed in parallel, one standard
    /// gzip member); zstd uses libzstd's multi-threaded mode, always with at least one
    /// worker so that the output does not depend on the worker count.
    pub fn new(out: W, compression: Compression, threads: usize) -> Result<Self> {
        let threads = threads.max(1);
        let inner = match compression {
            Compression::None => Inner::None(out),
            Compression::Gzip { level } => {
                let builder = ParCompressBuilder::<Gzip>::new()
                    .num_threads(threads)
                    .and_then(|b| b.buffer_size(GZIP_BLOCK))
                    .map_err(|e| Error::Io {
                        context: "configuring gzip compressor".into(),
                        source: io::Error::other(e.to_string()),
                    })?
                    .compression_level(flate2::Compression::new(level.min(9)));
                Inner::Gzip(builder.from_writer(out))
            }
            Compression::Zstd { level } => {
                let cfg = |e| Error::Io {
                    context: "configuring zstd compressor".into(),
                    source: e,
                };
                let mut enc = zstd::stream::write::Encoder::new(out, level).map_err(cfg)?;
                enc.multithread(threads as u32).map_err(cfg)?;
                enc.include_checksum(true).map_err(cfg)?;
                Inner::Zstd(enc)
            }
        };
        Ok(Compressor { inner: Some(inner) })
    }

    /// Finish the stream and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        match self.inner.take() {
            Some(Inner::None(mut w)) => {
                w.flush()?;
                Ok(w)
            }
            Some(Inner::Gzip(mut p)) => p.finish().map_err(gzp_err),
            Some(Inner::Zstd(e)) => e.finish(),
            None => Err(io::Error::other("compressor already finished")),
        }
    }

    /// Tear down after an error; the output is incomplete. (Dropping does the same.)
    pub fn abandon(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        // gzp's own Drop unwraps the result of finishing, which would panic after a
        // write error: finish explicitly and ignore the error instead.
        if let Some(Inner::Gzip(mut p)) = self.inner.take() {
            let _ = p.finish();
        }
    }

    fn inner(&mut self) -> io::Result<&mut Inner<W>> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("compressor already finished"))
    }
}

impl<W: Write + Send + 'static> Drop for Compressor<W> {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn gzp_err(e: gzp::GzpError) -> io::Error {
    match e {
        gzp::GzpError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl<W: Write + Send + 'static> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner()? {
            Inner::None(w) => w.write(buf),
            Inner::Gzip(p) => p.write(buf),
            Inner::Zstd(e) => e.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.inner()? {
            Inner::None(w) => w.write_all(buf),
            Inner::Gzip(p) => p.write_all(buf),
            Inner::Zstd(e) => e.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn compression_names_round_trip_and_reject_the_rest() {
        for (word, c) in [
            ("gzip", Compression::gzip()),
            ("zstd", Compression::zstd()),
            ("none", Compression::None),
            ("gzip:9", Compression::Gzip { level: 9 }),
            ("zstd:19", Compression::Zstd { level: 19 }),
        ] {
            assert_eq!(word.parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string(), word);
        }
        assert_eq!("gzip:6".parse::<Compression>().unwrap().to_string(), "gzip");
        for bad in [
            "", "gz", "xz", "zstd:0", "zstd:23", "gzip:10", "gzip:x", "none:1", "GZIP",
        ] {
            let e = bad.parse::<Compression>().unwrap_err();
            assert!(
                e.to_string().contains("use gzip, zstd or none"),
                "{bad}: {e}"
            );
        }
    }

    use super::*;

    fn sample() -> Vec<u8> {
        // Compressible but not trivial: ~3 MiB.
        let mut v = Vec::new();
        let mut x: u32 = 1;
        while v.len() < 3 << 20 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let word = (x >> 16) % 64;
            v.extend_from_slice(format!("word{word} ").as_bytes());
        }
        v
    }

    fn compress(data: &[u8], c: Compression, threads: usize, chunk: usize) -> Vec<u8> {
        let mut comp = Compressor::new(Vec::new(), c, threads).unwrap();
        for part in data.chunks(chunk) {
            comp.write_all(part).unwrap();
            comp.flush().unwrap();
        }
        comp.finish().unwrap()
    }

    #[test]
    fn deterministic_across_threads_and_chunking() {
        let data = sample();
        for c in [Compression::gzip(), Compression::zstd(), Compression::None] {
            let a = compress(&data, c, 1, 4096);
            let b = compress(&data, c, 2, 1 << 20);
            let d = compress(&data, c, 3, 77_777);
            assert_eq!(a, b, "{c:?} differs between 1 and 2 threads");
            assert_eq!(a, d, "{c:?} differs between 1 and 3 threads");
            let mut out = Vec::new();
            decompress(&a[..]).unwrap().read_to_end(&mut out).unwrap();
            assert_eq!(out, data, "{c:?} round trip");
        }
    }

    /// Pins the exact compressed bytes. If this fails, a dependency change (gzp, the
    /// flate2 backend chosen by feature unification, libzstd, or the block size) has
    /// changed layer digests: builds are no longer reproducible across versions.
    #[test]
    fn golden_output() {
        let data = sample();
        let gz = crate::Digest::of(&compress(&data, Compression::gzip(), 2, 65536));
        let zs = crate::Digest::of(&compress(&data, Compression::zstd(), 2, 65536));
        assert_eq!(
            (gz.to_string(), zs.to_string()),
            (GOLDEN_GZIP.to_string(), GOLDEN_ZSTD.to_string())
        );
    }

    const GOLDEN_GZIP: &str =
        "sha256:b59eca36a83f8e2af73831db4fd5a97c5d09929afb46ffc04334533b2d658eab";
    const GOLDEN_ZSTD: &str =
        "sha256:6774be90a226ee9f0830bad64c314c08f8e21ab39d9c472b401e8b9d94544d92";

    #[test]
    fn failing_sink_is_an_error_not_a_panic() {
        struct Failing(usize);
        impl Write for Failing {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 < buf.len() {
                    return Err(io::Error::other("disk full"));
                }
                self.0 -= buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let data = sample();
        for c in [Compression::gzip(), Compression::zstd()] {
            // Finish reports the error.
            let mut comp = Compressor::new(Failing(1000), c, 2).unwrap();
            let wrote = data.chunks(65536).try_for_each(|p| comp.write_all(p));
            assert!(wrote.is_err() || comp.finish().is_err(), "{c:?}");
            // Dropping without finishing does not panic either.
            let mut comp = Compressor::new(Failing(1000), c, 2).unwrap();
            let _ = data.chunks(65536).try_for_each(|p| comp.write_all(p));
            drop(comp);
        }
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect(&[0x1f, 0x8b, 8]).unwrap(), Format::Gzip);
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]).unwrap(), Format::Zstd);
        assert_eq!(detect(b"hello").unwrap(), Format::Plain);
        assert_eq!(detect(b"").unwrap(), Format::Plain);
        assert!(detect(&[0xfd, b'7', b'z', b'X', b'Z', 0]).is_err());
        assert!(detect(b"BZh9").is_err());
        let mut out = Vec::new();
        decompress(&b"ab"[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"ab");
    }

    #[test]
    fn multi_member_gzip() {
        let mut all = Vec::new();
        for part in [&b"hello "[..], &b"world"[..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            all.extend(e.finish().unwrap());
        }
        let mut out = String::new();
        decompress(&all[..])
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
    }
}
