//! Export benchmark (not a test).
//!
//! ```text
//! export_bench prepare DIR [MB]          # copy real files from /usr into DIR (~700 MB)
//! export_bench export DIR gzip|zstd|none [STORE_URL]
//! export_bench apply LAYER_FILE TARGET_DIR   # extraction speed (plain, gzip or zstd)
//! ```
//!
//! `export` runs one export of DIR into a fresh blob store (default: a new directory
//! under /tmp) and prints throughput (uncompressed tar MB per second of wall time).
//! Run it under `/usr/bin/time -v` for peak RSS; compare with
//! `tar -C DIR -cf - . | gzip -6 | sha256sum` and `... | zstd -3 -T0 | sha256sum`.
//! `image/examples/export_bench.sh` does all of that.

use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Instant;

use farm_image::{BlobStore, Compression, ExportOptions, LayerTarOptions, export_dir};

fn prepare(dst: &Path, limit: u64) -> std::io::Result<u64> {
    fs::create_dir_all(dst)?;
    let mut total = 0u64;
    let mut stack: Vec<PathBuf> = [
        "/usr/share",
        "/usr/include",
        "/usr/bin",
        "/usr/lib",
        "/usr/libexec",
    ]
    .iter()
    .map(PathBuf::from)
    .rev()
    .collect();
    while let Some(dir) = stack.pop() {
        if total >= limit {
            break;
        }
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries.into_iter().rev() {
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix("/").unwrap_or(&p);
            let target = dst.join(rel);
            if md.is_dir() {
                fs::create_dir_all(&target)?;
                stack.push(p);
            } else if md.file_type().is_symlink() {
                if let (Ok(l), Some(parent)) = (fs::read_link(&p), target.parent()) {
                    fs::create_dir_all(parent)?;
                    let _ = symlink(l, &target);
                }
            } else if md.is_file() && total < limit {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)?;
                }
                if fs::copy(&p, &target).is_ok() {
                    total += md.size();
                }
            }
        }
    }
    Ok(total)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: export_bench prepare DIR [MB] | export_bench export DIR gzip|zstd|none [STORE_URL]";
    match args.get(1).map(String::as_str) {
        Some("prepare") => {
            let dir = PathBuf::from(args.get(2).expect(usage));
            let mb: u64 = args.get(3).map_or(700, |s| s.parse().expect("MB"));
            let n = prepare(&dir, mb << 20).expect("copying files");
            println!("copied {} MB of files into {}", n >> 20, dir.display());
        }
        Some("export") => {
            let dir = PathBuf::from(args.get(2).expect(usage));
            let compression = match args.get(3).map(String::as_str) {
                Some("gzip") => Compression::gzip(),
                Some("zstd") => Compression::zstd(),
                Some("none") => Compression::None,
                _ => panic!("{usage}"),
            };
            let store_dir;
            let url = match args.get(4) {
                Some(u) => u.clone(),
                None => {
                    store_dir = std::env::temp_dir()
                        .join(format!("farm-bench-store-{}", std::process::id()));
                    format!("file://{}", store_dir.display())
                }
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            let store = BlobStore::from_url(&url).unwrap();
            let start = Instant::now();
            let layer = rt
                .block_on(export_dir(
                    &store,
                    &dir,
                    &LayerTarOptions::whole_dir().source_date_epoch(Some(0)),
                    &ExportOptions::new(compression),
                ))
                .unwrap();
            let secs = start.elapsed().as_secs_f64();
            let mb = layer.tar_size as f64 / 1e6;
            println!(
                "{compression:?}: tar {:.0} MB -> blob {:.0} MB in {secs:.2} s = {:.1} MB/s\n  diff_id {}\n  digest  {}",
                mb,
                layer.size as f64 / 1e6,
                mb / secs,
                layer.diff_id,
                layer.digest
            );
            if args.get(4).is_none() {
                let _ = fs::remove_dir_all(url.trim_start_matches("file://"));
            }
        }
        Some("apply") => {
            let tarball = PathBuf::from(args.get(2).expect(usage));
            let dir = PathBuf::from(args.get(3).expect(usage));
            fs::create_dir_all(&dir).unwrap();
            let start = Instant::now();
            let f = fs::File::open(&tarball).unwrap();
            let stats =
                farm_image::apply_layer(f, &dir, &farm_image::ApplyOptions::default()).unwrap();
            let secs = start.elapsed().as_secs_f64();
            println!(
                "applied {} entries, {:.0} MB tar in {secs:.2} s = {:.1} MB/s (diff_id {})",
                stats.entries,
                stats.tar_size as f64 / 1e6,
                stats.tar_size as f64 / 1e6 / secs,
                stats.diff_id
            );
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
