//! Reading the compiled object and the kernel's BTF without a new dependency: the sections of
//! a little-endian ELF64 file, the types of a BTF blob (names, kinds, struct members), and the
//! one patch the loader needs, turning the placeholder helper call `progs/sockets.bpf.c`
//! writes for `bpf_sock_destroy()` into a kfunc call (aya resolves no `__ksym` externs).
//! Pure functions over bytes; the loader reads the files.

use std::ops::Range;

/// The helper id `progs/sockets.bpf.c` calls in place of `bpf_sock_destroy()` (`KFUNC_SOCK_DESTROY`).
pub(crate) const KFUNC_PLACEHOLDER: i32 = 0x7a00;
/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// `BPF_PSEUDO_KFUNC_CALL`, in the source-register nibble.
const PSEUDO_KFUNC_CALL: u8 = 2;

/// Why the bytes are not what was expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ObjectError {
    #[error("not a little-endian ELF64 object")]
    NotElf,
    #[error("section headers out of bounds")]
    Truncated,
    #[cfg(test)]
    #[error("no section {0}")]
    NoSection(&'static str),
    #[error("not a BTF blob")]
    NotBtf,
    #[error("BTF type {0} is of unknown kind {1}")]
    UnknownKind(u32, u32),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// Every section of `elf`: name and byte range.
pub(crate) fn sections(elf: &[u8]) -> Result<Vec<(String, Range<usize>)>, ObjectError> {
    // e_ident: magic, ELFCLASS64 (2), ELFDATA2LSB (1).
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(ObjectError::NotElf);
    }
    let t = ObjectError::Truncated;
    let shoff = u64_at(elf, 0x28).ok_or(ObjectError::Truncated)?;
    let shentsize = usize::from(u16_at(elf, 0x3a).ok_or(ObjectError::Truncated)?);
    let shnum = usize::from(u16_at(elf, 0x3c).ok_or(ObjectError::Truncated)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e).ok_or(ObjectError::Truncated)?);
    let header = |i: usize| -> Option<(u32, Range<usize>)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(elf, h)?;
        let off = u64_at(elf, h + 24)?;
        let size = u64_at(elf, h + 32)?;
        let end = off.checked_add(size)?;
        (end <= elf.len()).then_some((name, off..end))
    };
    let (_, strtab) = header(shstrndx).ok_or(ObjectError::Truncated)?;
    let names = &elf[strtab];
    let mut out = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let (name, range) = header(i).ok_or(ObjectError::Truncated)?;
        let name = names.get(name as usize..).ok_or(ObjectError::Truncated)?;
        let name = name.split(|c| *c == 0).next().unwrap_or_default();
        out.push((String::from_utf8_lossy(name).into_owned(), range));
    }
    if out.is_empty() {
        return Err(t);
    }
    Ok(out)
}

/// The bytes of section `name` of `elf`.
#[cfg(test)]
pub(crate) fn section<'a>(elf: &'a [u8], name: &'static str) -> Result<&'a [u8], ObjectError> {
    let (_, r) = sections(elf)?
        .into_iter()
        .find(|(n, _)| n == name)
        .ok_or(ObjectError::NoSection(name))?;
    Ok(&elf[r])
}

/// A copy of `elf` with every placeholder call in the `iter/*` sections made a call of the
/// kernel function with BTF id `btf_id` (in vmlinux), and how many calls were patched.
pub(crate) fn patch_kfunc(elf: &[u8], btf_id: u32) -> Result<(Vec<u8>, usize), ObjectError> {
    let mut out = elf.to_vec();
    let mut patched = 0;
    for (name, range) in sections(elf)? {
        if !name.starts_with("iter/") {
            continue;
        }
        for insn in out[range].chunks_exact_mut(8) {
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if insn[0] == CALL && insn[1] == 0 && imm == KFUNC_PLACEHOLDER {
                insn[1] = PSEUDO_KFUNC_CALL << 4;
                insn[4..8].copy_from_slice(&btf_id.to_le_bytes());
                patched += 1;
            }
        }
    }
    Ok((out, patched))
}

/// BTF kinds this reader names (`BTF_KIND_*`).
#[cfg(test)]
pub(crate) const KIND_STRUCT: u32 = 4;
pub(crate) const KIND_FUNC: u32 = 12;

/// One member of a BTF struct: name, offset in bits, type id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) bit_offset: u32,
}

/// One BTF type: id, name, size (structs), members (structs and unions). The loader needs
/// only ids; the layout test reads the rest.
#[derive(Debug, Clone)]
#[cfg_attr(not(test), expect(dead_code))]
pub(crate) struct BtfType {
    pub(crate) id: u32,
    pub(crate) name: String,
    pub(crate) size: u32,
    pub(crate) members: Vec<Member>,
}

/// Every type of a little-endian BTF blob (`.BTF` of an object, or `/sys/kernel/btf/vmlinux`),
/// filtered by `keep(kind, name)` before members are collected.
pub(crate) fn btf_types(
    btf: &[u8],
    mut keep: impl FnMut(u32, &str) -> bool,
) -> Result<Vec<BtfType>, ObjectError> {
    let bad = || ObjectError::NotBtf;
    if u16_at(btf, 0) != Some(0xeb9f) {
        return Err(bad());
    }
    let hdr_len = u32_at(btf, 4).ok_or_else(bad)? as usize;
    let type_off = u32_at(btf, 8).ok_or_else(bad)? as usize;
    let type_len = u32_at(btf, 12).ok_or_else(bad)? as usize;
    let str_off = u32_at(btf, 16).ok_or_else(bad)? as usize;
    let str_len = u32_at(btf, 20).ok_or_else(bad)? as usize;
    let types = btf
        .get(hdr_len + type_off..hdr_len + type_off + type_len)
        .ok_or_else(bad)?;
    let strings = btf
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .ok_or_else(bad)?;
    let name = |off: u32| -> String {
        let s = strings.get(off as usize..).unwrap_or_default();
        String::from_utf8_lossy(s.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
    };
    let mut out = Vec::new();
    let (mut at, mut id) = (0usize, 1u32);
    while at + 12 <= types.len() {
        let name_off = u32_at(types, at).ok_or_else(bad)?;
        let info = u32_at(types, at + 4).ok_or_else(bad)?;
        let size = u32_at(types, at + 8).ok_or_else(bad)?;
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let body = at + 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            2 | 7..=13 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 => 8 * vlen,                // ENUM
            _ => return Err(ObjectError::UnknownKind(id, kind)),
        };
        let extra = if kind == 13 { 8 * vlen } else { extra }; // FUNC_PROTO params
        let n = name(name_off);
        if keep(kind, &n) {
            let mut members = Vec::new();
            if kind == 4 || kind == 5 {
                let kflag = info >> 31 == 1;
                for m in 0..vlen {
                    let m_at = body + 12 * m;
                    let m_name = u32_at(types, m_at).ok_or_else(bad)?;
                    let off = u32_at(types, m_at + 8).ok_or_else(bad)?;
                    members.push(Member {
                        name: name(m_name),
                        bit_offset: if kflag { off & 0x00ff_ffff } else { off },
                    });
                }
            }
            out.push(BtfType {
                id,
                name: n,
                size,
                members,
            });
        }
        at = body + extra;
        id += 1;
    }
    Ok(out)
}

/// The id of the function `name` in `btf`.
pub(crate) fn func_id(btf: &[u8], name: &str) -> Result<Option<u32>, ObjectError> {
    Ok(btf_types(btf, |k, n| k == KIND_FUNC && n == name)?
        .first()
        .map(|t| t.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_committed_objects() {
        let [progs, obj] = super::super::loader::objects();
        let names: Vec<String> = sections(progs).unwrap().into_iter().map(|s| s.0).collect();
        for want in ["cgroup/connect4", "cgroup/getpeername6", ".BTF", ".maps"] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert_eq!(
            patch_kfunc(progs, 4242).unwrap().1,
            0,
            "no kfunc in the programs"
        );
        let names: Vec<String> = sections(obj).unwrap().into_iter().map(|s| s.0).collect();
        for want in ["iter/udp", "iter/tcp", ".BTF", ".maps"] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        let (patched, n) = patch_kfunc(obj, 4242).unwrap();
        assert_eq!(n, 2, "one bpf_sock_destroy() call per iterator");
        assert_eq!(patched.len(), obj.len());
        let (_, again) = patch_kfunc(&patched, 4242).unwrap();
        assert_eq!(again, 0, "nothing left to patch");
        let diff = obj.iter().zip(&patched).filter(|(a, b)| a != b).count();
        assert!(
            diff <= 2 * 5,
            "only the two call instructions change ({diff} bytes)"
        );
        assert_eq!(sections(b"not an elf"), Err(ObjectError::NotElf));
        assert_eq!(
            btf_types(b"nope", |_, _| true).err(),
            Some(ObjectError::NotBtf)
        );
    }

    #[test]
    fn finds_bpf_sock_destroy_in_the_kernel_btf() {
        let Ok(vmlinux) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux");
            return;
        };
        assert!(func_id(&vmlinux, "bpf_sock_destroy").unwrap().is_some());
        assert_eq!(func_id(&vmlinux, "no_such_function_l4lb").unwrap(), None);
    }
}
