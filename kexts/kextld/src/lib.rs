//! `kextld`: the project's own kext linker, and the checks around it.
//!
//! - [`link`]: objects + static libraries (members pulled on demand) → an x86_64
//!   `MH_KEXT_BUNDLE` in the shape xnu's kernel linker (`libkern/kxld`) and kmutil accept.
//! - [`image`]: a reader of linked bundles (segments, sections, symbols, relocations).
//! - [`check`]: a bundle checked against the kernel linker's rules.
//! - [`load`]: a bundle mapped into this process, slid and bound the way the kernel does it
//!   (tests run the kexts' machine code through it).
//!
//! The rules are summarised in `../shared/notes/darwin-facts.md` ("What the kernel's linker
//! accepts") and cited at each step.

pub mod check;
#[doc(hidden)]
pub mod fixture;
pub mod image;
pub mod link;
#[cfg(unix)]
pub mod load;
