//! Fixed-capacity containers that decode within a stated limit.
//!
//! `BoundedVec<T, N>` and `BoundedString<N>` are the only collections in the wire types.
//! With the `alloc` feature they are backed by the heap (`Vec`, `String`), without it by
//! `heapless` (so firmware without an allocator speaks the same format). Either way:
//!
//! - the wire form is postcard's sequence / string form (varint length, then items), so
//!   the two backings produce identical bytes;
//! - decoding more than `N` items (or `N` bytes of UTF-8) is an error *before* anything is
//!   stored, so a hostile length prefix cannot make the decoder allocate more than
//!   `N * size_of::<T>()`.

use core::fmt;
use core::marker::PhantomData;
use core::ops::Deref;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A sequence of at most `N` items.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BoundedVec<T, const N: usize> {
    #[cfg(feature = "alloc")]
    items: alloc::vec::Vec<T>,
    #[cfg(not(feature = "alloc"))]
    items: heapless::Vec<T, N>,
}

/// Returned when an item does not fit; hands the item back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full<T>(pub T);

impl<T, const N: usize> BoundedVec<T, N> {
    /// The capacity limit.
    pub const CAPACITY: usize = N;

    /// An empty sequence.
    pub const fn new() -> Self {
        Self {
            #[cfg(feature = "alloc")]
            items: alloc::vec::Vec::new(),
            #[cfg(not(feature = "alloc"))]
            items: heapless::Vec::new(),
        }
    }

    /// Appends `item`, or hands it back when the sequence already holds `N` items.
    pub fn push(&mut self, item: T) -> Result<(), Full<T>> {
        if self.items.len() >= N {
            return Err(Full(item));
        }
        #[cfg(feature = "alloc")]
        {
            self.items.push(item);
            Ok(())
        }
        #[cfg(not(feature = "alloc"))]
        {
            self.items.push(item).map_err(Full)
        }
    }

    /// The items as a slice.
    pub fn as_slice(&self) -> &[T] {
        &self.items
    }

    /// Builds a sequence from an iterator; fails if it yields more than `N` items.
    pub fn try_from_iter<I: IntoIterator<Item = T>>(iter: I) -> Result<Self, Full<T>> {
        let mut out = Self::new();
        for item in iter {
            out.push(item)?;
        }
        Ok(out)
    }
}

impl<T: Clone, const N: usize> BoundedVec<T, N> {
    /// Copies `items`; fails if there are more than `N`.
    pub fn try_from_slice(items: &[T]) -> Result<Self, Full<()>> {
        if items.len() > N {
            return Err(Full(()));
        }
        Self::try_from_iter(items.iter().cloned()).map_err(|_| Full(()))
    }
}

#[cfg(feature = "alloc")]
impl<T, const N: usize> BoundedVec<T, N> {
    /// Consumes the sequence into a `Vec`.
    pub fn into_vec(self) -> alloc::vec::Vec<T> {
        self.items
    }
}

impl<T, const N: usize> Default for BoundedVec<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> Deref for BoundedVec<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<T: fmt::Debug, const N: usize> fmt::Debug for BoundedVec<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.items.iter()).finish()
    }
}

impl<T: Serialize, const N: usize> Serialize for BoundedVec<T, N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.items.iter())
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = BoundedVec<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                if let Some(len) = seq.size_hint()
                    && len > N
                {
                    return Err(de::Error::invalid_length(len, &self));
                }
                let mut out = BoundedVec::new();
                while let Some(item) = seq.next_element()? {
                    if out.push(item).is_err() {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                }
                Ok(out)
            }
        }
        deserializer.deserialize_seq(V::<T, N>(PhantomData))
    }
}

/// UTF-8 text of at most `N` bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoundedString<const N: usize> {
    #[cfg(feature = "alloc")]
    text: alloc::string::String,
    #[cfg(not(feature = "alloc"))]
    text: heapless::String<N>,
}

impl<const N: usize> BoundedString<N> {
    /// The capacity limit in bytes.
    pub const CAPACITY: usize = N;

    /// Empty text.
    pub const fn new() -> Self {
        Self {
            #[cfg(feature = "alloc")]
            text: alloc::string::String::new(),
            #[cfg(not(feature = "alloc"))]
            text: heapless::String::new(),
        }
    }

    /// Copies `s`; fails when it is longer than `N` bytes.
    pub fn try_from_str(s: &str) -> Result<Self, Full<()>> {
        if s.len() > N {
            return Err(Full(()));
        }
        #[cfg(feature = "alloc")]
        {
            Ok(Self { text: s.into() })
        }
        #[cfg(not(feature = "alloc"))]
        {
            let mut text = heapless::String::new();
            text.push_str(s).map_err(|_| Full(()))?;
            Ok(Self { text })
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<const N: usize> Default for BoundedString<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Deref for BoundedString<N> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl<const N: usize> fmt::Debug for BoundedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> fmt::Display for BoundedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> Serialize for BoundedString<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de, const N: usize> Deserialize<'de> for BoundedString<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> Visitor<'_> for V<N> {
            type Value = BoundedString<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "text of at most {N} bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                BoundedString::try_from_str(v).map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        deserializer.deserialize_str(V::<N>)
    }
}
