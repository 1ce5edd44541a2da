"""The deprivileging core (cpuvirt/cpu/deprivilege.py): ring compression, the shadow GDT, emulation of
privileged instructions against the VirtualCpu, ring-1 event delivery, the I/O privilege check.

A probe guest (below) runs privileged instructions whose results a ring-0 kernel can check; it must
give native's console under a deprivileging mode, and the trace must show the emulations.
"""
import json

import pytest

from cpuvirt.cpu.deprivilege import HV_CR0, SHADOW_GDT_WINDOW, ShadowGdt, VirtualCpu
from cpuvirt.engine import regs as R
from cpuvirt.machine.machine import Machine
from cpuvirt.runner import BOOT_GDT_GPA, run_guest
from cpuvirt.toolchain.build import include_dir
from cpuvirt.toolchain.image import build_image
from cpuvirt.toolchain.preprocess import preprocess
from cpuvirt.x86.flags import EFLAGS_IOPL

PROBE = r"""
# description: deprivileging probe: privileged instructions a ring-0 kernel can check
#include "kernel.inc"
#include "user.inc"

.text
main:
    call user_init
    SET_HANDLER(VEC_GP, probe_gp)
    SET_HANDLER(VEC_BP, probe_bp)

    # control registers read back what was written (virtual CRs under deprivileging)
    mov eax, cr4
    or eax, CR4_PSE
    mov cr4, eax
    mov ebx, cr4
    CHECK_EQ("mov cr4 reads back", ebx, eax)
    mov eax, 0x00123000
    mov cr3, eax
    mov ebx, cr3
    CHECK_EQ("mov cr3 reads back", ebx, 0x00123000)
    xor eax, eax
    mov cr3, eax
    mov eax, cr0
    and eax, 0xFFFF
    CHECK_EQ("cr0 low bits are the loader's PE|ET", eax, 0x11)

    # debug registers keep what was written
    mov eax, 0x00123450
    mov dr0, eax
    mov ebx, dr0
    CHECK_EQ("mov dr0 reads back", ebx, 0x00123450)

    # a bad selector is the guest's own #GP, with its error code; DS is unchanged
    mov dword ptr [gp_resume], after_bad_ds
    mov ax, 0xFFF8
    mov ds, ax
after_bad_ds:
    CHECK_EQ("mov ds, beyond the GDT limit: #GP", dword ptr [gp_count], 1)
    CHECK_EQ("its error code is the selector", dword ptr [gp_error], 0xFFF8)
    xor eax, eax
    mov ax, ds
    CHECK_EQ("ds keeps the guest's selector 0x10", eax, KERNEL_DS)

    # push/pop of a data segment register, far call and far return to the kernel's code segment
    push ds
    pop es
    xor eax, eax
    mov ax, es
    CHECK_EQ("pop es loads the kernel data selector", eax, KERNEL_DS)
    .byte 0x9A
    .long far_target
    .word KERNEL_CS
    CHECK_EQ("lcall KERNEL_CS:far_target ran it and retf came back", dword ptr [far_ran], 1)

    # a kernel that reads CS/SS natively (RPL 1 under ring compression) and reloads them keeps working
    push cs
    mov eax, after_push_cs_retf
    push eax
    .byte 0xCB                          # retf
after_push_cs_retf:
    mov ax, ss
    mov ss, ax
    PASS("push cs; push label; retf and mov ss, ss reload the kernel's own segments")

    # ltr marked the guest's TSS descriptor busy, as the CPU does
    movzx eax, byte ptr [gdt_tss + 5]
    CHECK_EQ("ltr set the busy bit in the guest's TSS descriptor", eax, 0x8B)

    # an exception frame shows the guest's view: CS 0x08, EFLAGS with IOPL 0
    int3
    CHECK_EQ("int3 frame CS is the ring-0 selector", dword ptr [bp_cs], KERNEL_CS)
    CHECK_EQ("int3 frame EFLAGS.IOPL is 0", dword ptr [bp_iopl], 0)

    # MSRs and cache instructions
    mov ecx, 0x1B
    rdmsr
    and eax, 0xFFFFF000
    CHECK_EQ("rdmsr IA32_APIC_BASE gives the APIC's address", eax, 0xFEE00000)
    wbinvd

    # the hypervisor's shadow-GDT window is never visible to the guest, even right after a load
    mov ax, KERNEL_DS
    mov es, ax
    mov eax, dword ptr [SHADOW_WINDOW + 0x14]
    CHECK_EQ("the shadow-GDT window reads as unbacked memory", eax, 0xFFFFFFFF)

#if USER_IO
    # I/O at CPL 3 with IOPL 0 is #GP and is not performed (it would end the machine)
    mov eax, user_out
    mov edx, user_stack_top
    call run_user
    CHECK_EQ("out at CPL 3, IOPL 0: #GP kills the task", eax, USER_KILLED | VEC_GP)
    CHECK_EQ("its error code is 0", dword ptr [user_fault_error], 0)
    mov eax, user_out_insn
    CHECK_EQ("its saved EIP is the out", dword ptr [user_fault_eip], eax)
#endif
    ret

far_target:
    mov dword ptr [far_ran], 1
    .byte 0xCB                          # retf

probe_gp:
    test dword ptr [ebx + FRAME_CS], 3
    jnz user_fault_handler
    inc dword ptr [gp_count]
    mov eax, dword ptr [ebx + FRAME_ERROR]
    mov dword ptr [gp_error], eax
    mov eax, dword ptr [gp_resume]
    mov dword ptr [ebx + FRAME_EIP], eax
    ret

probe_bp:
    mov eax, dword ptr [ebx + FRAME_CS]
    mov dword ptr [bp_cs], eax
    mov eax, dword ptr [ebx + FRAME_EFLAGS]
    and eax, EFLAGS_IOPL
    mov dword ptr [bp_iopl], eax
    ret

user_out:
    mov al, 0x77
user_out_insn:
    out DEBUG_EXIT, al
    mov eax, SYS_EXIT
    mov ebx, 1
    int 0x80

.data
.align 4
gp_count:  .long 0
gp_error:  .long 0
gp_resume: .long 0
far_ran:   .long 0
bp_cs:     .long 0
bp_iopl:   .long 0
"""


def _build(d, user_io: bool):
    src = d / "probe.S"
    src.write_text(PROBE.replace("SHADOW_WINDOW", hex(SHADOW_GDT_WINDOW)))
    pre = preprocess(src, {"USER_IO": "1" if user_io else "0"}, [include_dir()])
    image, _ = build_image(pre.lines)
    path = d / f"probe{int(user_io)}.bin"
    path.write_bytes(image)
    return path


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """The probe without the user-mode I/O check: cpuvirt's native mode, like the engine, performs
    in/out at CPL 3 whatever IOPL says (UNICORN-NOTES.md), so native cannot pass that one."""
    return _build(tmp_path_factory.mktemp("probe"), False)


@pytest.fixture(scope="module")
def probe_user_io(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("probe_io"), True)


def test_probe_passes_native(probe):
    res = run_guest(str(probe), "native")
    assert res.outcome == "exit" and res.status == 0, res.console.decode()
    assert b"FAIL" not in res.console and res.console.count(b"PASS") == 15


def test_probe_trap_equals_native(probe, probe_user_io, tmp_path):
    native = run_guest(str(probe), "native")
    trap = run_guest(str(probe), "trap")
    assert trap.console == native.console, trap.console.decode()
    assert (trap.outcome, trap.status) == ("exit", 0)
    trace = tmp_path / "t.jsonl"
    trap = run_guest(str(probe_user_io), "trap", trace_path=str(trace))
    assert (trap.outcome, trap.status) == ("exit", 0), trap.console.decode()
    assert trap.console.startswith(native.console) and b"FAIL" not in trap.console
    assert trap.console.count(b"PASS") == native.console.count(b"PASS") + 3
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    traps = {(e["reason"], e["insn"]) for e in events if e.get("kind") == "trap"}
    for want in [("mov", "mov cr4, eax"), ("mov", "mov dr0, eax"), ("mov", "mov ebx, dr0"), ("mov", "mov ebx, cr3"), ("mov", "mov ds, ax"), ("pop", "pop es"),
                 ("lcall", None), ("retf", "retf"), ("ltr", "ltr ax"), ("rdmsr", "rdmsr"), ("wbinvd", "wbinvd"),
                 ("iretd", "iretd"), ("out", None), ("lgdt", None), ("lidt", None)]:
        assert any(r == want[0] and (want[1] is None or i == want[1]) for r, i in traps), want
    # the user-mode out became a #GP for the guest, never a debug exit
    assert any(e.get("kind") == "exception" and e.get("reason") == "#GP" and e["insn"].startswith("out")
               for e in events)
    assert not any(e.get("reason") == "DEBUG_EXIT" and e["detail"].get("value") == 0x77 for e in events)


def test_shadow_descriptor_compression():
    kcode, kdata = (0x0000FFFF, 0x00CF9A00), (0x0000FFFF, 0x00CF9200)
    ucode = (0x0000FFFF, 0x00CFFA00)
    tss = (0x0CD00067, 0x00008910)
    assert ShadowGdt.compress(*kcode) == (0x0000FFFF, 0x00CFBA00)     # DPL 0 -> DPL 1
    assert ShadowGdt.compress(*kdata) == (0x0000FFFF, 0x00CFB200)
    assert ShadowGdt.compress(*ucode) == ucode                        # DPL 3 stays
    assert ShadowGdt.compress(*tss) == tss                            # system descriptors stay


def _booted_trap():
    from cpuvirt.modes.trap import TrapMode
    m = Machine(32)
    mode = TrapMode(m)                       # the runner's order: mode, loader state, boot
    m.set_flat_protected_mode(BOOT_GDT_GPA)
    cr4 = m.regs.read(R.CR4)
    mode.boot()
    assert mode.vcpu.virtual_cpu.cr4 == cr4 == m.regs.read(R.CR4)     # the guest sees the boot CR4, which stays real
    return m, mode.vcpu


def test_boot_drops_the_kernel_to_ring_1():
    m, vcpu = _booted_trap()
    regs = m.regs
    assert regs.read(R.CS) == 0x09 and regs.read(R.SS) == 0x11        # ring compression
    assert regs.read(R.DS) == 0x10                                    # data selectors keep the guest's
    assert vcpu.vcpl() == 0
    assert regs.read(R.CR0) == HV_CR0                                 # the hypervisor's CR0
    assert vcpu.virtual_cpu.cr0 == 0x11 and vcpu.virtual_cpu.crs()[:2] == (0x11, 0)         # what the guest believes
    assert vcpu.virtual_cpu.gdtr == (BOOT_GDT_GPA, 23)
    assert regs.table(R.GDTR)[1:3] == (BOOT_GDT_GPA, 23)              # the guest's GDT is the real one
    assert vcpu.guest_selector(regs.read(R.CS)) == 0x08
    assert vcpu.guest_eflags() & EFLAGS_IOPL == 0


def test_virtual_cpu_is_not_in_guest_memory():
    v = VirtualCpu()
    assert v.crs() == (0x11, 0, 0) and v.iopl == 0
    m, vcpu = _booted_trap()
    # The shadow GDT sits in the hypervisor's host region, outside every guest-physical mapping.
    assert vcpu.shadow.hpa >= vcpu.hv_mem.hpa and m.p2m.gpa_to_hpa(0) != vcpu.shadow.hpa
    assert all(m.p2m.gpa_to_hpa(g) is None or not vcpu.hv_mem.contains(m.p2m.gpa_to_hpa(g))
               for g in range(0, m.mem_bytes, 1 << 20))


LDT_LOAD = r"""
#include "kernel.inc"
.text
main:
    mov ax, LDT_SEL
    lldt ax
    mov ax, 0x0C                        # LDT entry 1, RPL 0
    mov ds, ax
    PASS("loaded ds from the LDT")
    mov ax, KERNEL_DS
    mov ds, ax
    ret
"""


def test_unsupported_instruction_ends_the_run_with_one_clear_line(tmp_path):
    src = tmp_path / "ldt.S"
    src.write_text(LDT_LOAD)
    image, _ = build_image(preprocess(src, {}, [include_dir()]).lines)
    path = tmp_path / "ldt.bin"
    path.write_bytes(image)
    assert run_guest(str(path), "native").console == b"PASS loaded ds from the LDT\n"
    res = run_guest(str(path), "trap")
    assert (res.outcome, res.status) == ("error", 123)     # the hypervisor stops the guest (cpuvirt/status.py)
    assert "mov ds, ax" in res.message and "LDT selector" in res.message and "\n" not in res.message


USER_IRQ = r"""
#include "kernel.inc"
#include "user.inc"
.text
main:
    call user_init
    SET_HANDLER(VEC_IRQ0, tick)
    mov ax, 0xFFFE                      # only IRQ 0
    call pic_set_mask
    mov ax, PIT_DIVISOR(1000)
    call pit_start_periodic
    call run_user_with_if
    cli
    mov ebx, eax
    mov ax, 0xFFFF
    call pic_set_mask
    CHECK_EQ("the user task exits with 0", ebx, 0)
    CHECK_EQ("the timer interrupted ring 3 three times", dword ptr [user_ticks], 3)
    CHECK_EQ("the frame of a ring-3 IRQ holds the user SS", dword ptr [tick_ss], USER_DS)
    CHECK_EQ("the frame of a ring-3 IRQ has IF = 1", dword ptr [tick_if], EFLAGS_IF)
    ret

# run_user with IF = 1 in ring 3 (run_user enters with IF = 0)
run_user_with_if:
    push ebx
    push esi
    push edi
    push ebp
    mov dword ptr [user_saved_esp], esp
    mov dword ptr [tss + 4], esp
    mov cx, USER_DS
    mov ds, cx
    mov es, cx
    mov fs, cx
    mov gs, cx
    push USER_DS
    push user_stack_top
    push EFLAGS_FIXED | EFLAGS_IF
    push USER_CS
    mov eax, spin
    push eax
    iretd

tick:
    test dword ptr [ebx + FRAME_CS], 3
    jz tick_eoi
    inc dword ptr [user_ticks]
    mov eax, dword ptr [ebx + FRAME_USER_SS]
    mov dword ptr [tick_ss], eax
    mov eax, dword ptr [ebx + FRAME_EFLAGS]
    and eax, EFLAGS_IF
    mov dword ptr [tick_if], eax
tick_eoi:
    mov al, 0
    call pic_eoi
    ret

spin:
    cmp dword ptr [user_ticks], 3
    jb spin
    mov eax, SYS_EXIT
    xor ebx, ebx
    int 0x80

.data
.align 4
user_ticks: .long 0
tick_ss:    .long 0
tick_if:    .long 0
"""


def test_iret_to_ring_3_keeps_the_kernels_if_under_trap(tmp_path):
    """The documented hole of native iret at ring 1 (docs/deprivileging.md, "Known limits"): the CPU
    does not load IF from the frame at CPL 1 > IOPL 0, so a user task entered with IF = 1 runs with the
    kernel's IF = 0. Native preempts it three times; under trap no timer interrupt ever reaches ring 3."""
    src = tmp_path / "uirq.S"
    src.write_text(USER_IRQ)
    image, _ = build_image(preprocess(src, {}, [include_dir()]).lines)
    path = tmp_path / "uirq.bin"
    path.write_bytes(image)
    native = run_guest(str(path), "native")
    assert (native.outcome, native.status) == ("exit", 0), native.console.decode()
    assert native.console.count(b"PASS") == 4
    trace = tmp_path / "t.jsonl"
    trap = run_guest(str(path), "trap", max_insns=3_000_000, trace_path=str(trace))
    assert trap.outcome == "budget"
    events = [json.loads(line) for line in trace.read_text().splitlines() if '"event"' in line]
    assert not any(e["kind"] == "interrupt" and e["cpl"] == 3 for e in events)


# The engine facts trap mode rests on (UNICORN-NOTES.md "Privilege"): at CPL 1 with IOPL 0 these raise
# #GP with EIP at the instruction; the holes run without a fault. Checked on a bare engine.
FAULTS_AT_RING_1 = {
    "cli": "fa", "sti": "fb", "hlt": "f4", "mov eax, cr0": "0f20c0", "mov cr3, eax": "0f22d8",
    "lgdt [0x1000]": "0f011500100000", "lidt [0x1000]": "0f011d00100000", "invlpg [eax]": "0f0138",
    "rdmsr": "0f32", "wrmsr": "0f30", "clts": "0f06", "lmsw ax": "0f01f0", "wbinvd": "0f09",
    "invd": "0f08", "ltr ax": "0f00d8", "lldt ax": "0f00d0", "mov ds, dx (DPL 0)": "8eda",
    "ljmp 0x08:0x2100": "ea002100000800", "mov eax, dr7": "0f21f8", "mov dr0, eax": "0f23c0",
}
SILENT_AT_RING_1 = {
    "popfd": "9c9d", "pushfd": "9c58", "sgdt [0x1800]": "0f010500180000", "sidt [0x1800]": "0f010d00180000",
    "smsw eax": "0f01e0", "str ax": "660f00c8", "sldt ax": "660f00c0", "mov ax, cs": "668cc8", "push cs": "0e58",
    "lar eax, edx": "0f02c2", "lsl eax, edx": "0f03c2", "verr dx": "0f00e2", "verw dx": "0f00ea",
    "mov ds, cx (DPL 1)": "8ed9",
}


def _ring1_engine(code: bytes):
    import ctypes
    import struct

    from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, Uc
    from unicorn import x86_const as X

    from cpuvirt.cpu.quirks import context_layout
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x10000)
    gdt = b"\0" * 8 + struct.pack("<QQQQ", 0x00CF9A000000FFFF, 0x00CF92000000FFFF,   # 0x08, 0x10: DPL 0
                                  0x00CFBA000000FFFF, 0x00CFB2000000FFFF)             # 0x18, 0x20: DPL 1
    uc.mem_write(0x1000, gdt)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x1000, len(gdt) - 1, 0))
    uc.reg_write(X.UC_X86_REG_CR0, 0x11)
    uc.reg_write(X.UC_X86_REG_CS, 0x08)
    uc.reg_write(X.UC_X86_REG_SS, 0x10)
    ctx = uc.context_save()
    slot = ctypes.c_uint32.from_address(ctypes.cast(ctx.context, ctypes.c_void_p).value + context_layout().hflags)
    slot.value = (slot.value & ~3) | 1
    uc.context_restore(ctx)
    uc.reg_write(X.UC_X86_REG_SS, 0x21)
    uc.reg_write(X.UC_X86_REG_CS, 0x19)
    uc.reg_write(X.UC_X86_REG_ESP, 0x8000)
    uc.reg_write(X.UC_X86_REG_EDX, 0x10)
    uc.reg_write(X.UC_X86_REG_ECX, 0x21)
    uc.mem_write(0x2000, code + b"\x90")
    seen = []

    def hook(u, intno, _):
        seen.append((intno, u.reg_read(X.UC_X86_REG_EIP)))
        u.emu_stop()
    uc.hook_add(UC_HOOK_INTR, hook)
    uc.emu_start(0x2000, 0x2000 + len(code))
    return seen


@pytest.mark.parametrize("name", FAULTS_AT_RING_1)
def test_engine_raises_gp_at_ring_1(name):
    assert _ring1_engine(bytes.fromhex(FAULTS_AT_RING_1[name])) == [(13, 0x2000)]


@pytest.mark.parametrize("name", SILENT_AT_RING_1)
def test_engine_runs_the_holes_at_ring_1_silently(name):
    assert _ring1_engine(bytes.fromhex(SILENT_AT_RING_1[name])) == []


@pytest.mark.parametrize("mode", ["trap", "full"])
def test_direct_segment_loads_equal_the_engines_own(mode, monkeypatch):
    """`_load_direct` writes the engine's segment caches without the shadow-GDT window: each load must
    leave the six segment caches and hflags exactly as the engine's own load through the window does
    (run both from the same state, compare, keep the engine's)."""
    import ctypes

    from cpuvirt.cpu import deprivilege as D
    from cpuvirt.cpu.quirks import HF_INHIBIT_IRQ
    from cpuvirt.cpu.segcache import segs_offset
    off = segs_offset()
    assert off is not None
    direct = D.DeprivilegedVcpu._load_direct
    checked = []

    def state(vcpu):
        c = vcpu.uc.context_save()
        a = ctypes.cast(c.context, ctypes.c_void_p).value
        hflags = ctypes.c_uint32.from_address(a + vcpu.faults.layout.hflags).value & ~HF_INHIBIT_IRQ
        return ctypes.string_at(a + off, 6 * 24), hflags

    def both(self, todo, ring):
        start = self.uc.context_save()
        if not direct(self, todo, ring):
            return False
        got = state(self)
        self.uc.context_restore(start)
        self._load_window(todo, ring)
        assert got == state(self), f"direct load {todo} ring {ring} differs from the engine's"
        checked.append(ring)
        return True

    monkeypatch.setattr(D.DeprivilegedVcpu, "_load_direct", both)
    r = run_guest("usermode", mode)
    assert r.outcome == "exit"
    assert {1, None} <= set(checked)           # ring changes into the kernel, data-segment loads
    if mode == "full":
        assert 3 in checked                    # iret to user code is a callout under full
