//! Commands over several CTs (`embed` / `predict` on a folder or a list): reading and
//! preprocessing the next CT on a background thread while the current one is computed, so
//! that the device (or the CPU's other threads) never waits for a file after the first one.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};

/// For each of `items` in order: `load(item)` on a background thread, then `consume(item,
/// loaded)` on this thread. Item i + 1 loads while item i is consumed (one item ahead: at most
/// two are held at a time). The first error, of either, ends the run: nothing after it is
/// consumed, and the loader stops after the item it is on.
pub fn pipelined<T: Send>(
    items: &[PathBuf],
    load: impl Fn(&Path) -> Result<T> + Sync,
    mut consume: impl FnMut(&Path, T) -> Result<()>,
) -> Result<()> {
    std::thread::scope(|scope| {
        // A rendezvous channel: the loader hands item i + 1 over only when item i is done, so at
        // most two items are held (the one consumed, the one loaded ahead).
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<T>>(0);
        let load = &load;
        scope.spawn(move || {
            for item in items {
                let r = load(item);
                let failed = r.is_err();
                // A closed channel means the consumer stopped: stop too.
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        for item in items {
            let loaded =
                rx.recv().map_err(|_| anyhow!("the reader of {} stopped without a result", item.display()))??;
            consume(item, loaded)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_consumed_in_order_and_loaded_ahead() {
        let items: Vec<PathBuf> = (0..5).map(|i| PathBuf::from(format!("ct{i}"))).collect();
        let loaded = std::sync::Mutex::new(Vec::new());
        let mut seen = Vec::new();
        pipelined(
            &items,
            |p| {
                loaded.lock().unwrap().push(p.to_path_buf());
                Ok(p.display().to_string().len())
            },
            |p, n| {
                // While item i is consumed, item i + 1 may already have been loaded, never i + 2.
                let ahead = loaded.lock().unwrap().len();
                let i = items.iter().position(|q| q == p).unwrap();
                assert!(ahead > i && ahead <= i + 2, "item {i}: {ahead} loaded");
                seen.push((p.to_path_buf(), n));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen.iter().map(|s| s.0.clone()).collect::<Vec<_>>(), items);
    }

    #[test]
    fn the_first_error_stops_the_run() {
        let items: Vec<PathBuf> = (0..6).map(|i| PathBuf::from(format!("ct{i}"))).collect();
        let mut consumed = Vec::new();
        let e = pipelined(
            &items,
            |p| if p.ends_with("ct2") { Err(anyhow!("{}: bad file", p.display())) } else { Ok(()) },
            |p, ()| {
                consumed.push(p.to_path_buf());
                Ok(())
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("ct2: bad file"), "{e}");
        assert_eq!(consumed, items[..2].to_vec());
        let e = pipelined(
            &items,
            |_| Ok(()),
            |p, ()| if p.ends_with("ct1") { Err(anyhow!("device failed")) } else { Ok(()) },
        )
        .unwrap_err();
        assert!(e.to_string().contains("device failed"));
    }
}
