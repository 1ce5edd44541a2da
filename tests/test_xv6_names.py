"""xv6's names in `trace show` and `compare`: system calls by name (read from the kernel's own
syscalls[] table), its interrupt vectors, user page faults, context switches (switchuvm's ltr and
lcr3), functions from the ELF symbol table and none for user addresses.

A small ELF laid out as xv6's kernel is (the same symbol names, a syscalls[] table of function
pointers, linked at 0x80100000 and loaded at 0x100000, an absolute symbol) is built here with
gcc -m32; the traces are written with cpuvirt's own TraceWriter, as a run would write them. The
real kernel is tested in tests/test_xv6.py when XV6_DIR names a build.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys

import pytest

from cpuvirt.trace.format import TraceWriter
from cpuvirt.trace.symbols import for_image

KERNEL_C = r"""
/* xv6's names (syscall.c, vm.c, proc.c, swtch.S, trapasm.S), with bodies that only need to exist. */
int sys_fork(void) { return 1; }
int sys_exit(void) { return 2; }
int sys_write(void) { return 3; }
int sys_close(void) { return 4; }
static int (*syscalls[])(void) = { [1] sys_fork, [2] sys_exit, [16] sys_write, [21] sys_close };
int syscall(int num) { return syscalls[num](); }
static inline void ltr(unsigned short sel) { asm volatile("ltr %0" :: "r"(sel)); }        /* x86.h */
static inline void lcr3(unsigned val) { asm volatile("mov %0, %%cr3" :: "r"(val) : "memory"); }
void switchuvm(unsigned pgdir) { ltr(0x28); lcr3(pgdir); }
void switchkvm(unsigned pgdir) { lcr3(pgdir); }
void pushcli(void) { asm volatile("cli"); }
void scheduler(void) { for (;;) asm volatile("sti; hlt"); }
asm(".globl entry\nentry: mov %cr4, %eax\n"
    ".globl swtch\nswtch: ret\n.globl alltraps\nalltraps: pushal\n.globl trapret\ntrapret: popal\niret\n");
"""
LINK_LD = """ENTRY(entry)
SECTIONS {
    . = 0x80100000;
    .text : AT(0x100000) { *(.text*) }
    .rodata : { *(.rodata*) }
    .data : { *(.data*) }
    /DISCARD/ : { *(.note*) *(.comment) *(.eh_frame*) }
}
"""


def cpuvirt(*args):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    d = tmp_path_factory.mktemp("xv6names")
    (d / "k.c").write_text(KERNEL_C)
    (d / "link.ld").write_text(LINK_LD)
    out = d / "kernel"
    cmd = ["gcc", "-m32", "-g", "-O2", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-fno-stack-protector",
           "-T", str(d / "link.ld"), "-Wl,--build-id=none", "-Wl,--defsym=_binary_entryother_size=0x8a",
           "-o", str(out), str(d / "k.c")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"gcc -m32 cannot build here: {p.stderr.strip()[:200]}")
    return out


def _at(image: bytes, syms, function: str, mnemonic: str) -> int:
    """The address of the first `mnemonic` instruction in `function` of the kernel image."""
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs
    from elftools.elf.elffile import ELFFile
    start = syms.resolve(function)
    elf = ELFFile(io.BytesIO(image))
    text = elf.get_section_by_name(".text")
    code = text.data()[start - text["sh_addr"]:start - text["sh_addr"] + 64]
    for addr, _, mnem, ops in Cs(CS_ARCH_X86, CS_MODE_32).disasm_lite(code, start):
        if f"{mnem} {ops}".startswith(mnemonic):
            return addr
    raise AssertionError(f"no {mnemonic} in {function}")


def _trace(path, image: bytes, mode: str, events) -> None:
    with open(path, "w") as f:
        w = TraceWriter(f, "kernel", hashlib.sha256(image).hexdigest(), mode, {})
        for icount, cpl, kind, reason, code, eip, insn, detail, action in events:
            w.event(icount, cpl, kind, reason, code, eip, insn, detail, action)
        w.footer("input_end", 0, 1000, {})


def test_an_xv6_kernels_names(kernel):
    s = for_image(kernel.read_bytes(), str(kernel))
    assert s.kernel is not None and s.kernel.name == "xv6"
    assert s.kernel.syscalls == {1: "fork", 2: "exit", 16: "write", 21: "close"}     # from syscalls[], by pointer
    assert s.name(0x8a) is None and s.name(0x358) is None, "user addresses and absolute symbols name nothing"
    entry = s.resolve("entry")
    assert s.name(entry - 0x80000000) == "entry", "run before paging, at its load address, it is still `entry`"
    assert s.kernel.syscall(99).startswith("99 (no such call")


def test_trace_show_and_compare_read_as_xv6(kernel, tmp_path):
    image = kernel.read_bytes()
    s = for_image(image, str(kernel))
    uvm_cr3, uvm_ltr = _at(image, s, "switchuvm", "mov cr3"), _at(image, s, "switchuvm", "ltr")
    kvm_cr3, cli = _at(image, s, "switchkvm", "mov cr3"), _at(image, s, "pushcli", "cli")
    sched = s.resolve("scheduler")
    write = (1, 3, "interrupt", "int 0x40", 64, 0x358, "int 0x40", {"vector": 64, "software": True, "eax": "0x10"},
             "delivered through the guest IDT")
    close = (2, 3, "interrupt", "int 0x40", 64, 0x3b0, "int 0x40", {"vector": 64, "software": True, "eax": "0x15"},
             "delivered through the guest IDT")
    timer = (3, 0, "interrupt", "IRQ vector 0x20", 32, sched, "sti", {}, "delivered through the guest IDT")
    upf = (4, 3, "page_fault", "#PF", 14, 0x1234, "mov eax, dword ptr [0x80000000]",
           {"cr2": "0x80000000", "error_code": 5, "access": "read", "fault": "true"}, "delivered #PF through the guest IDT")
    native = tmp_path / "native.jsonl"
    _trace(native, image, "native", [write, close, write, timer, upf])
    trap = tmp_path / "trap.jsonl"
    _trace(trap, image, "trap", [
        (0, 1, "trap", "mov", 13, s.resolve("entry") - 0x80000000, "mov eax, cr4", {"cr": 4}, "emulated"),
        write, (5, 1, "trap", "cli", 13, cli, "cli", {"if": 0}, "emulated against the virtual CPU"),
        (6, 1, "trap", "ltr", 13, uvm_ltr, "ltr ax", {"selector": "0x28"}, "emulated against the virtual CPU"),
        (7, 1, "trap", "mov", 13, uvm_cr3, "mov cr3, eax", {"cr": 3}, "emulated against the virtual CPU"),
        (8, 1, "trap", "mov", 13, kvm_cr3, "mov cr3, eax", {"cr": 3}, "emulated against the virtual CPU"),
        close, write, timer, upf])
    hw = tmp_path / "hw.jsonl"
    _trace(hw, image, "hw", [write, close, write, (9, 0, "vmexit", "INTERRUPT_WINDOW", 7, sched, "sti", {},
                                                   "window open: injected external interrupt vector 0x20"), upf])

    p = cpuvirt("trace", "show", trap, "--image", kernel)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    assert any("an xv6 kernel: its system calls (4, from its syscalls[] table)" in x for x in lines)
    line_of = {x.split()[1]: x for x in lines if x.strip() and x.split()[0].isdigit()}   # by icount
    assert "xv6: system call write (16)" in line_of["1"] and " @ " not in line_of["1"]   # user code: no kernel name
    assert "xv6: system call close (21)" in line_of["2"]
    assert "xv6: context switch: switchuvm loads the process's TSS (ltr)" in line_of["6"]
    assert "xv6: context switch: switchuvm loads the process's page table (lcr3)" in line_of["7"]
    assert "@ switchuvm+0x" in line_of["7"] and "@ switchkvm+0x" in line_of["8"]
    assert "back to the scheduler: switchkvm" in line_of["8"]
    assert "xv6: timer interrupt (IRQ 0, vector 32)" in line_of["3"]
    assert "xv6: page fault in user code at 0x80000000" in line_of["4"]
    assert "xv6: pushcli: interrupts off" in line_of["5"]
    assert line_of["0"].rstrip().endswith("@ entry")

    p = cpuvirt("compare", native, trap, hw, "--image", kernel, "--json")
    assert p.returncode == 0, p.stderr
    sites = json.loads(p.stdout)["sites"]
    by_where = {}
    for site in sites:
        by_where.setdefault(site["where"], []).append(site)
    (w,) = by_where["system call 16"]
    assert (w["symbol"], w["instruction"]) == ("sys_write", "int 0x40")
    assert [w["runs"][m]["events"] for m in ("native", "trap", "hw")] == [2, 2, 2]
    (c,) = by_where["system call 21"]
    assert c["symbol"] == "sys_close" and c["runs"]["trap"]["events"] == 1
    (t,) = by_where["IRQ 0"]
    assert t["symbol"] == "timer" and t["runs"]["native"]["what"] == "interrupt IRQ vector 0x20"
    assert t["runs"]["hw"]["what"] == "VM exit INTERRUPT_WINDOW"
    (u,) = by_where["user page fault"]
    assert [u["runs"][m]["events"] for m in ("native", "trap", "hw")] == [1, 1, 1]
    cr3 = [x for x in sites if x["instruction"].startswith("mov cr3")]
    assert {x["symbol"].split("+")[0] for x in cr3} == {"switchuvm", "switchkvm"}, "one row per caller of lcr3"
    assert {x["meaning"] for x in cr3} == {"context switch: switchuvm loads the process's page table (lcr3)",
                                           "back to the scheduler: switchkvm loads the kernel's page table (lcr3)"}
    assert not any(x["where"].startswith("0x3") for x in sites), "no row per user address of an `int 0x40`"
    text = cpuvirt("compare", native, trap, hw, "--image", kernel).stdout.decode()
    assert "system call 16  sys_write  int 0x40" in text
    assert "    = context switch: switchuvm loads the process's TSS (ltr)" in text
