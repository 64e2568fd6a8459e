//! A fixed-capacity FIFO allocated at setup; pushing and popping never allocate (for driver
//! queues of completions, events and pending messages on I/O paths).

use alloc::vec;
use alloc::vec::Vec;

#[derive(Debug)]
pub struct Fifo<T: Copy> {
    buf: Vec<T>,
    head: usize,
    len: usize,
}

impl<T: Copy> Fifo<T> {
    /// Setup time only (allocates `capacity` slots filled with `fill`).
    pub fn new(capacity: usize, fill: T) -> Self {
        Fifo {
            buf: vec![fill; capacity],
            head: 0,
            len: 0,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn free(&self) -> usize {
        self.buf.len() - self.len
    }
    /// Buffer index of the `i`-th element from the front, for `i <= len`: `head < cap`
    /// and `i <= cap`, so one conditional subtraction wraps it (no divide on the I/O path).
    #[inline]
    fn index(&self, i: usize) -> usize {
        let at = self.head + i;
        if at >= self.buf.len() {
            at - self.buf.len()
        } else {
            at
        }
    }
    /// Appends; false (and nothing stored) when full.
    pub fn push(&mut self, v: T) -> bool {
        if self.len >= self.buf.len() {
            return false;
        }
        let at = self.index(self.len);
        match self.buf.get_mut(at) {
            Some(slot) => {
                *slot = v;
                self.len += 1;
                true
            }
            None => false,
        }
    }
    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let v = self.buf.get(self.head).copied();
        self.head = self.index(1);
        self.len -= 1;
        v
    }
    pub fn front(&self) -> Option<T> {
        self.get(0)
    }
    /// The `i`-th element from the front.
    pub fn get(&self, i: usize) -> Option<T> {
        if i >= self.len {
            return None;
        }
        self.buf.get(self.index(i)).copied()
    }
    /// Forgets every element (e.g. after a device reset).
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }
    /// Mutable access to the `i`-th element from the front.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        if i >= self.len {
            return None;
        }
        let at = self.index(i);
        self.buf.get_mut(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_bounds() {
        let mut f = Fifo::new(3, 0u32);
        assert!(f.push(1) && f.push(2) && f.push(3));
        assert!(!f.push(4));
        assert_eq!(f.free(), 0);
        assert_eq!(f.pop(), Some(1));
        assert!(f.push(4));
        if let Some(x) = f.get_mut(1) {
            *x = 30;
        }
        assert_eq!(
            (f.front(), f.get(1), f.get(2), f.get(3)),
            (Some(2), Some(30), Some(4), None)
        );
        assert_eq!(
            (f.pop(), f.pop(), f.pop(), f.pop()),
            (Some(2), Some(30), Some(4), None)
        );
        assert!(f.is_empty());
        assert_eq!(f.len(), 0);
        assert!(f.push(7) && f.push(8));
        f.clear();
        assert_eq!((f.len(), f.pop()), (0, None));
    }

    /// Every capacity from 0 to 5 against `VecDeque`, through many wraps of the head.
    #[test]
    fn matches_a_deque_across_wraps() {
        use alloc::collections::VecDeque;
        for cap in 0..6usize {
            let mut f = Fifo::new(cap, 0u32);
            let mut d = VecDeque::new();
            let mut x: u32 = 1;
            for step in 0..200u32 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                if x >> 16 & 3 != 0 {
                    let pushed = f.push(step);
                    assert_eq!(pushed, d.len() < cap, "cap {cap}, step {step}");
                    if pushed {
                        d.push_back(step);
                    }
                } else {
                    assert_eq!(f.pop(), d.pop_front(), "cap {cap}, step {step}");
                }
                assert_eq!(f.len(), d.len());
                for i in 0..=cap {
                    assert_eq!(f.get(i), d.get(i).copied(), "cap {cap}, step {step}, {i}");
                }
            }
        }
    }
}
