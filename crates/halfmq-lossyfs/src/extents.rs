//! The bytes written to a file and not yet made durable: non-overlapping extents by offset.

use std::collections::BTreeMap;

/// Pending writes of one file, merged so that no two extents overlap or touch.
#[derive(Debug, Default)]
pub(crate) struct Extents {
    map: BTreeMap<u64, Vec<u8>>,
}

impl Extents {
    /// Bytes pending in all extents.
    pub(crate) fn bytes(&self) -> u64 {
        self.map.values().map(|v| v.len() as u64).sum()
    }

    /// Record `data` written at `offset`; it wins over what was pending there.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // Extents that overlap or touch [offset, end].
        let touching: Vec<u64> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|(s, v)| **s + v.len() as u64 >= offset)
            .map(|(s, _)| *s)
            .collect();
        let Some(&first) = touching.last() else {
            self.map.insert(offset, data.to_vec());
            return;
        };
        let start = first.min(offset);
        let mut merged_end = end;
        for s in &touching {
            let len = self.map.get(s).map_or(0, |v| v.len() as u64);
            merged_end = merged_end.max(s + len);
        }
        // Reuse the lowest extent's buffer when it starts the merged one (appends in place).
        let mut buf = if first == start {
            self.map.remove(&first).unwrap_or_default()
        } else {
            Vec::new()
        };
        buf.resize((merged_end - start) as usize, 0);
        for s in touching.iter().filter(|s| **s != first || first != start) {
            if let Some(v) = self.map.remove(s) {
                let at = (s - start) as usize;
                buf[at..at + v.len()].copy_from_slice(&v);
            }
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.map.insert(start, buf);
    }

    /// Forget everything at or beyond `len` (a truncation).
    pub(crate) fn truncate(&mut self, len: u64) {
        let beyond: Vec<u64> = self.map.range(len..).map(|(s, _)| *s).collect();
        for s in beyond {
            self.map.remove(&s);
        }
        if let Some((s, v)) = self.map.range_mut(..len).next_back() {
            let keep = (len - *s) as usize;
            if v.len() > keep {
                v.truncate(keep);
            }
        }
    }

    /// Copy the pending bytes that fall in `[offset, offset + buf.len())` over `buf`.
    pub(crate) fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        let from = self
            .map
            .range(..=offset)
            .next_back()
            .map_or(offset, |(s, _)| *s);
        for (s, v) in self.map.range(from..end) {
            let (s, e) = (*s, s + v.len() as u64);
            let (lo, hi) = (s.max(offset), e.min(end));
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&v[(lo - s) as usize..(hi - s) as usize]);
            }
        }
    }

    /// Every pending extent, by offset, leaving none.
    pub(crate) fn take_all(&mut self) -> BTreeMap<u64, Vec<u8>> {
        std::mem::take(&mut self.map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(e: &Extents, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        e.overlay(offset, &mut b);
        b
    }

    #[test]
    fn writes_merge_and_the_last_one_wins() {
        let mut e = Extents::default();
        e.write(10, b"abcd");
        e.write(14, b"ef"); // touching: merged
        e.write(8, b"XY"); // touching the front
        e.write(11, b"Z"); // inside
        e.write(100, b"far");
        assert_eq!(e.map.len(), 2);
        assert_eq!(read(&e, 8, 8), b"XYaZcdef");
        assert_eq!(read(&e, 98, 6), b"\0\0far\0");
        e.write(0, &[1u8; 200]); // covers both
        assert_eq!(e.map.len(), 1);
        assert_eq!(read(&e, 0, 200), vec![1u8; 200]);
        assert_eq!(e.bytes(), 200);
    }

    #[test]
    fn truncate_cuts_extents() {
        let mut e = Extents::default();
        e.write(0, b"hello");
        e.write(10, b"world");
        e.truncate(3);
        assert_eq!(e.bytes(), 3);
        assert_eq!(read(&e, 0, 6), b"hel\0\0\0");
        e.truncate(0);
        assert_eq!(e.bytes(), 0);
    }
}
