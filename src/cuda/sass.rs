//! What the kernels' machine code does per loop iteration, read from the SASS that
//! `cuobjdump -sass` prints for the fatbin's sm_90 code: per kernel, its instructions, its
//! loops (a backward branch closes one) with their instruction, HMMA, FFMA and global-memory
//! counts, and its local-memory accesses (STL/LDL: spilled registers or stack arrays).
//!
//! build.rs includes this file (std only) to summarise the SASS at build time into a small
//! text table (`Kernel::to_line` / `parse_table`) that the crate embeds; the plan prices a
//! launch's issue time from it (`cost::issue_instructions`).

/// One loop of a kernel: the instructions from the target of a backward branch up to the last
/// branch back to it (nested loops' instructions included, each counted once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loop {
    /// Byte offsets of its first instruction and of its last back-edge.
    pub start: u32,
    pub end: u32,
    pub instructions: u32,
    pub hmma: u32,
    pub ffma: u32,
    /// Bytes of global memory one warp moves per iteration (loads, stores, cp.async; every
    /// lane active).
    pub global_bytes: u32,
}

impl Loop {
    pub fn contains(&self, other: &Loop) -> bool {
        self != other && self.start <= other.start && other.end <= self.end
    }
    fn holds(&self, addr: u32) -> bool {
        self.start <= addr && addr <= self.end
    }
}

/// One kernel's machine code, summarised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kernel {
    pub name: String,
    pub instructions: u32,
    pub hmma: u32,
    pub ffma: u32,
    /// STL + LDL instructions.
    pub local: u32,
    pub loops: Vec<Loop>,
    /// Instructions outside every loop.
    pub straight: u32,
    /// Each loop's own part (`own_part`), derived from `loops` once, when the kernel is built.
    own: Vec<Loop>,
}

/// An instruction: its offset, opcode (with modifiers) and, for a direct branch, its target.
struct Instr {
    addr: u32,
    opcode: String,
    target: Option<u32>,
}

fn parse_instr(line: &str) -> Option<Instr> {
    let l = line.trim_start();
    let rest = l.strip_prefix("/*")?;
    let (addr, rest) = rest.split_once("*/")?;
    let addr = u32::from_str_radix(addr.trim(), 16).ok()?;
    let body = rest.split(';').next()?.trim();
    let mut tokens = body.split_whitespace().peekable();
    if tokens.peek().is_some_and(|t| t.starts_with('@')) {
        tokens.next();
    }
    let opcode = tokens.next()?.to_string();
    let target = if opcode == "BRA" || opcode.starts_with("BRA.") {
        tokens
            .find(|t| t.starts_with("0x"))
            .and_then(|t| u32::from_str_radix(t.trim_start_matches("0x").trim_end_matches(','), 16).ok())
    } else {
        None
    };
    Some(Instr { addr, opcode, target })
}

/// Bytes one warp moves through global memory with this instruction (0 for anything else).
fn global_bytes(opcode: &str) -> u32 {
    let global =
        ["LDG", "STG", "LDGSTS", "RED", "ATOMG"].iter().any(|p| opcode == *p || opcode.starts_with(&format!("{p}.")));
    if !global {
        return 0;
    }
    let width = opcode.split('.').skip(1).find_map(|m| match m {
        "U8" | "S8" => Some(1),
        "U16" | "S16" => Some(2),
        "64" => Some(8),
        "128" => Some(16),
        _ => None,
    });
    32 * width.unwrap_or(4)
}

fn summarise(name: &str, code: &[Instr]) -> Kernel {
    let is = |i: &Instr, p: &str| i.opcode == p || i.opcode.starts_with(&format!("{p}."));
    let real: Vec<&Instr> = code.iter().filter(|i| i.opcode != "NOP").collect();
    // Back-edges: a branch to an earlier instruction (a branch to itself is the trap after
    // EXIT, not a loop); several back-edges to one target close one loop.
    let mut loops: Vec<Loop> = Vec::new();
    for i in &real {
        if let Some(t) = i.target.filter(|&t| t < i.addr) {
            match loops.iter_mut().find(|l| l.start == t) {
                Some(l) => l.end = l.end.max(i.addr),
                None => loops.push(Loop { start: t, end: i.addr, instructions: 0, hmma: 0, ffma: 0, global_bytes: 0 }),
            }
        }
    }
    for l in &mut loops {
        let (start, end) = (l.start, l.end);
        for i in real.iter().filter(|i| start <= i.addr && i.addr <= end) {
            l.instructions += 1;
            l.hmma += is(i, "HMMA") as u32;
            l.ffma += is(i, "FFMA") as u32;
            l.global_bytes += global_bytes(&i.opcode);
        }
    }
    loops.sort_by_key(|l| (l.start, std::cmp::Reverse(l.end)));
    Kernel::new(
        name.to_string(),
        [
            real.len() as u32,
            real.iter().filter(|i| is(i, "HMMA")).count() as u32,
            real.iter().filter(|i| is(i, "FFMA")).count() as u32,
            real.iter().filter(|i| is(i, "STL") || is(i, "LDL")).count() as u32,
            real.iter().filter(|i| !loops.iter().any(|l| l.holds(i.addr))).count() as u32,
        ],
        loops,
    )
}

/// Every kernel in `cuobjdump -sass` output (of one architecture).
pub fn parse_cuobjdump(text: &str) -> Vec<Kernel> {
    let mut kernels = Vec::new();
    let mut current: Option<(String, Vec<Instr>)> = None;
    for line in text.lines() {
        if let Some(name) = line.trim().strip_prefix("Function : ") {
            if let Some((n, code)) = current.take() {
                kernels.push(summarise(&n, &code));
            }
            current = Some((name.trim().to_string(), Vec::new()));
        } else if let (Some((_, code)), Some(i)) = (current.as_mut(), parse_instr(line)) {
            code.push(i);
        }
    }
    if let Some((n, code)) = current {
        kernels.push(summarise(&n, &code));
    }
    kernels
}

impl Kernel {
    /// A kernel from its counts `[instructions, hmma, ffma, local, straight]` and loops; the
    /// loops' own parts are derived here, once.
    fn new(name: String, counts: [u32; 5], loops: Vec<Loop>) -> Kernel {
        let [instructions, hmma, ffma, local, straight] = counts;
        let own = (0..loops.len())
            .map(|i| {
                let mut l = loops[i].clone();
                // Less the loops directly inside it (no loop between).
                let outer = &loops[i];
                for c in loops
                    .iter()
                    .filter(|m| outer.contains(m) && !loops.iter().any(|o| outer.contains(o) && o.contains(m)))
                {
                    l.instructions -= c.instructions;
                    l.hmma -= c.hmma;
                    l.ffma -= c.ffma;
                    l.global_bytes -= c.global_bytes;
                }
                l
            })
            .collect();
        Kernel { name, instructions, hmma, ffma, local, loops, straight, own }
    }

    /// The loops that hold an HMMA with no smaller loop around it: where a tensor-core
    /// kernel spends its issue slots.
    pub fn innermost_hmma_loops(&self) -> Vec<&Loop> {
        self.loops.iter().filter(|l| l.hmma > 0 && !self.loops.iter().any(|m| l.contains(m) && m.hmma > 0)).collect()
    }

    /// Loop `i`'s own part: its counts less those of the loops directly inside it (each
    /// instruction of the kernel belongs to the own part of exactly one loop, or to none).
    pub fn own_part(&self, i: usize) -> &Loop {
        &self.own[i]
    }

    /// Every loop's own part, in the order of `loops`.
    pub fn own_parts(&self) -> &[Loop] {
        &self.own
    }

    /// Instructions per HMMA over every loop whose own part issues HMMAs, each passing once:
    /// what the issue model charges per HMMA (None without HMMA in a loop). Unlike
    /// `instructions_per_hmma` it sees HMMAs peeled or unrolled into an outer loop.
    pub fn nest_instructions_per_hmma(&self) -> Option<f64> {
        let own: Vec<&Loop> = self.own.iter().filter(|l| l.hmma > 0).collect();
        let h: u32 = own.iter().map(|l| l.hmma).sum();
        (h > 0).then(|| own.iter().map(|l| l.instructions).sum::<u32>() as f64 / h as f64)
    }

    /// The largest instructions-per-HMMA ratio among the innermost HMMA loops (None without
    /// one): at about 6 or more, mma.sync cannot keep the tensor cores busy.
    pub fn instructions_per_hmma(&self) -> Option<f64> {
        self.innermost_hmma_loops().iter().map(|l| l.instructions as f64 / l.hmma as f64).max_by(f64::total_cmp)
    }

    /// One line of the embedded table: `kernel NAME I H F L S` then `loop START END I H F B`
    /// per loop, `;`-separated.
    pub fn to_line(&self) -> String {
        let mut s = format!(
            "kernel {} {} {} {} {} {}",
            self.name, self.instructions, self.hmma, self.ffma, self.local, self.straight
        );
        for l in &self.loops {
            s += &format!(";loop {} {} {} {} {} {}", l.start, l.end, l.instructions, l.hmma, l.ffma, l.global_bytes);
        }
        s
    }
}

/// The kernels of a table written by `Kernel::to_line`, one per line (malformed lines are
/// skipped: the table is generated, never edited).
pub fn parse_table(text: &str) -> Vec<Kernel> {
    let num = |t: Option<&str>| t.and_then(|v| v.parse::<u32>().ok());
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split(';');
            let mut h = parts.next()?.split_whitespace();
            (h.next()? == "kernel").then_some(())?;
            let name = h.next()?.to_string();
            let (instructions, hmma, ffma, local, straight) =
                (num(h.next())?, num(h.next())?, num(h.next())?, num(h.next())?, num(h.next())?);
            let loops = parts
                .map(|p| {
                    let mut t = p.split_whitespace();
                    (t.next()? == "loop").then_some(())?;
                    Some(Loop {
                        start: num(t.next())?,
                        end: num(t.next())?,
                        instructions: num(t.next())?,
                        hmma: num(t.next())?,
                        ffma: num(t.next())?,
                        global_bytes: num(t.next())?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Kernel::new(name, [instructions, hmma, ffma, local, straight], loops))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-written kernel: a grid-stride loop (0x40-0x90) holding an inner HMMA loop
    /// (0x50-0x70, taken back twice), a spill, and the trap after EXIT.
    const SASS: &str = "
	code for sm_90
		Function : toy
	.headerflags	@\"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)\"
        /*0000*/                   LDC R1, c[0x0][0x28] ;             /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                  /* 0x0000000000007919 */
        /*0020*/                   STL [R1], R0 ;                      /* 0x0000000001007387 */
        /*0030*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ; /* 0x000000100000780c */
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;    /* 0x0000000402047981 */
        /*0050*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ; /* 0x000000060408723c */
        /*0060*/              @P0 BRA 0x50 ;                           /* 0xfffffffc00000947 */
        /*0070*/              @P1 BRA 0x50 ;                           /* 0xfffffffc00000947 */
        /*0080*/                   FFMA R9, R9, R9, R9 ;               /* 0x0000000909097223 */
        /*0090*/              @P2 BRA 0x40 ;                           /* 0xfffffffc00000947 */
        /*00a0*/                   LDL R0, [R1] ;                      /* 0x0000000001007983 */
        /*00b0*/                   STG.E.U16 desc[UR4][R2.64], R0 ;    /* 0x0000000002007986 */
        /*00c0*/                   EXIT ;                              /* 0x000000000000794d */
        /*00d0*/                   BRA 0xd0;                           /* 0xfffffffc00fc7947 */
        /*00e0*/                   NOP;                                /* 0x0000000000007918 */
		Function : empty
        /*0000*/                   EXIT ;                              /* 0x000000000000794d */
";

    #[test]
    fn loops_counts_and_spills_of_a_hand_counted_kernel() {
        let ks = parse_cuobjdump(SASS);
        assert_eq!(ks.len(), 2);
        let k = &ks[0];
        assert_eq!(k.name, "toy");
        // 14 instructions (the NOP is padding), 1 HMMA, 1 FFMA, one STL and one LDL.
        assert_eq!((k.instructions, k.hmma, k.ffma, k.local), (14, 1, 1, 2));
        assert_eq!(k.loops.len(), 2, "{:?}", k.loops);
        let (outer, inner) = (&k.loops[0], &k.loops[1]);
        assert_eq!(
            (outer.start, outer.end, outer.instructions, outer.hmma, outer.ffma, outer.global_bytes),
            (0x40, 0x90, 6, 1, 1, 512)
        );
        assert_eq!((inner.start, inner.end, inner.instructions, inner.hmma, inner.global_bytes), (0x50, 0x70, 3, 1, 0));
        assert!(outer.contains(inner) && !inner.contains(outer));
        // 0x00-0x30 and 0xa0-0xd0 lie outside both loops: 8 instructions.
        assert_eq!(k.straight, 8);
        assert_eq!(k.innermost_hmma_loops(), vec![inner]);
        assert_eq!(k.instructions_per_hmma(), Some(3.0));
        // The outer loop's own part: 0x40 and 0x80-0x90 (3 instructions, the FFMA, 512 bytes).
        let own = k.own_part(0);
        assert_eq!((own.instructions, own.hmma, own.ffma, own.global_bytes), (3, 0, 1, 512));
        assert_eq!(*k.own_part(1), *inner);
        assert_eq!(k.nest_instructions_per_hmma(), Some(3.0));
        assert_eq!(ks[1].instructions_per_hmma(), None);
        assert_eq!((ks[1].instructions, ks[1].straight), (1, 1));
    }

    #[test]
    fn the_table_round_trips() {
        let ks = parse_cuobjdump(SASS);
        let text: String = ks.iter().map(|k| k.to_line() + "\n").collect();
        assert_eq!(parse_table(&text), ks);
        assert!(parse_table("kernel broken 1 2\n").is_empty());
    }

    #[test]
    fn global_widths() {
        assert_eq!(global_bytes("LDG.E"), 128);
        assert_eq!(global_bytes("LDG.E.U16"), 64);
        assert_eq!(global_bytes("LDGSTS.E.BYPASS.128"), 512);
        assert_eq!(global_bytes("STG.E.64"), 256);
        assert_eq!(global_bytes("LDS.U16"), 0);
        assert_eq!(global_bytes("LDGDEPBAR"), 0);
    }
}
