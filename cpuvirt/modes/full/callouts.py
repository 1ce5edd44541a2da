"""The callouts of mode `full`: the guest-kernel instructions the translator does not leave native,
emulated by the hypervisor (cpuid, int n / int3 / into, in/out, rdtsc, icebp, the #UD forms, the x87
pointers stored by fnstenv/fxsave), the rest through the deprivileging core's emulator
(cpu/deprivilege.py). A mixin of FullVcpu (vcpu.py).
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import TYPE_CHECKING, Callable

from cpuvirt.bt.fastcallout import (
    ADAPTIVE,
    CPUID,
    INVLPG,
    IO_DX,
    IRETD,
    KIND_NAMES,
    MOV_CR0,
    MOV_CR3,
    MOV_CR4,
    NO_LOOKUP,
    PORT_IN,
    PORT_OUT,
    PYTHON,
    RDTSC,
)
from cpuvirt.cpu.vcpu import EXIT_HYPERVISOR_STOP
from cpuvirt.cpu.virtualcpu import GuestFault
from cpuvirt.engine import regs as R
from cpuvirt.engine.hooks import hook_guard
from cpuvirt.memory.mmu import GuestPageFault
from cpuvirt.modes.full.evfast import site_kind
from cpuvirt.status import Unsupported
from cpuvirt.x86.cpuid import CR4_RESERVED
from cpuvirt.x86.emulate import memory_site
from cpuvirt.x86.flags import CR0_PE

if TYPE_CHECKING:  # a mixin of FullVcpu (vcpu.py): mypy reads it against the deprivileging vCPU
    from cpuvirt.bt.direct import Direct16
    from cpuvirt.bt.runtime import BtRuntime
    from cpuvirt.bt.tcache import TCache
    from cpuvirt.cpu.deprivilege import DeprivilegedVcpu as _VcpuBase
    from cpuvirt.modes.full.crfast import CrState
    from cpuvirt.modes.full.deliverfast import FullDelivery
    from cpuvirt.modes.full.evfast import FullEvents
else:
    _VcpuBase = object

_CPUID, _RDTSC, _PORTS = 1 << CPUID, 1 << RDTSC, 1 << PORT_IN  # bits of Callouts._fast_kinds
_ADAPTIVE, _INVLPG = 1 << ADAPTIVE, 1 << INVLPG


class Callouts(_VcpuBase):
    """What a callout runs (bt/runtime.py hands the Site here through `on_callout`)."""

    # FullVcpu's state this mixin uses (vcpu.py sets each up), and what its other mixins do
    tc: TCache
    rt: BtRuntime
    direct16: Direct16
    crfast: CrState | None  # crfast.py
    evfast: FullEvents | None  # evfast.py
    _entered: int | None  # vcpu.py: the guest EIP enter_kernel last went to
    fdeliver: FullDelivery | None  # deliverfast.py: the common deliveries in C
    _adaptive_store: Callable[[int], None]  # adaptive.py
    adaptive_stores: int  # vcpu.py
    _virtual_changed: Callable[[], None]  # coherence.py
    check_code_mappings: Callable[..., None]  # coherence.py
    _fast_kinds = 0  # the callout kinds the C hook answers (_CPUID | _RDTSC)

    def _link_fast_callouts(self) -> None:
        """After install_hooks: the C callout hook answers cpuid and rdtsc sites with the engine's
        own C answers (the CPU model's table, the virtual clock), once each site was served here."""
        fast = self.rt.fast
        if fast is None:
            return
        table = getattr(self, "cpuid_table", None)
        if table is not None:
            fast.answer(CPUID, table.hook_function, table.pointer)
            self._fast_kinds |= _CPUID
        clock = self.clock
        if self.rdtsc_in_c:
            fast.answer(RDTSC, clock._lib.vclock_rdtsc_hook, ctypes.cast(ctypes.pointer(clock._state), ctypes.c_void_p))
            self._fast_kinds |= _RDTSC
        fast.window(clock._state, type(clock._state).watch_if.offset, type(clock._state).check_if.offset)
        # adaptive stores that change nothing but memory (into page tables that derive nothing from the
        # words, or beside translated code) and invlpg of a page without translated code (bt/_callout.c):
        # CPUVIRT_ADAPTIVE_C=0 / CPUVIRT_INVLPG_C=0 keep them Python's
        if os.environ.get("CPUVIRT_ADAPTIVE_C", "1") != "0":
            self._fast_kinds |= _ADAPTIVE
        if os.environ.get("CPUVIRT_INVLPG_C", "1") != "0":
            self._fast_kinds |= _INVLPG
        from cpuvirt.cpu import iosites
        from cpuvirt.cpu.vcpu import IO_CYCLES

        if iosites.enabled():  # the kernel's in/out: CPUVIRT_IO_GATE_C=0 keeps them Python's
            fast.ports(clock, IO_CYCLES, self._c_port_in, self._c_port_out)
            self._fast_kinds |= _PORTS

    def sync_counts(self) -> None:
        """Add what the C callout hook served since the last call to the run's counters, as the
        Python path counts it (an event and a reason per callout; the TC's callouts and lookups)."""
        fast = self.rt.fast
        if fast is None:
            return
        if self.fdeliver is not None:
            self.fdeliver.fold()
        for kind, n in fast.take().items():
            self.tally(self.event_kind, KIND_NAMES[kind], n)
            if kind == MOV_CR3:
                self.mmu.strategy.count_reloads(n)
            elif kind == ADAPTIVE:  # what _adaptive_store and ShadowPaging.guest_store count
                self.adaptive_stores += n
                self.mmu.strategy.counters.guest_stores += n
            c = self.tc.counters
            c.callouts += n
            if kind not in NO_LOOKUP:
                c.lookups += n

    @hook_guard(returns=0)
    def _c_port_in(self, port: int, size: int) -> int:
        """The C callout hook serves a linked `in` of the guest kernel (its time spent there): what the
        Python callout counts (the TC's callout and lookup, kernel_port_io's event, the access), then the
        device."""
        self._count_c_port("in")
        return self.machine.bus.read(port, size)

    @hook_guard(returns=0)
    def _c_port_out(self, port: int, size: int, value: int) -> int:
        """As _c_port_in for `out`; 0 when the access ended the run (the C hook then leaves EIP)."""
        self._count_c_port("out")
        self.machine.bus.write(port, size, value)
        return 0 if self.outcome is not None else 1  # (finish stopped the engine)

    def _count_c_port(self, direction: str) -> None:
        self.mmu.crs = None
        c = self.tc.counters
        c.callouts += 1
        self._counts[self.event_kind] += 1
        self._reasons[self.event_kind, direction] += 1
        self._counts["io"] += 1
        c.lookups += 1

    def _callout_then_window(self, site) -> int | None:
        try:
            return self._callout(site)
        finally:
            self.clock.if_may_have_changed()  # an emulated iret/popf may have set IF

    def _callout(self, site) -> int | None:
        """Emulate the guest instruction of a callout; returns the guest EIP to go on at (the next
        instruction) or None when the emulation set EIP and the ring itself."""
        ins = site.insn
        geip = ins.geip
        self.mmu.crs = None
        if site.kind == "adaptive":
            self._adaptive_store(geip)
            return None
        if site.kind == "fpu_env":
            self._fpu_pointers_to_guest(geip, site.raw)
            return (geip + ins.size) & 0xFFFFFFFF
        fast = self._special(geip, ins, site)
        if fast is not False:
            return fast
        raw = site.raw
        if len(raw) == 3 and raw[0] == 0x0F and raw[1] == 0x22 and raw[2] >> 6 == 3:
            nxt = self._mov_to_cr(geip, raw[2])
            if nxt is not None:
                return nxt
        self.regs.write(R.EIP, geip)
        self._entered = None
        if self.emulate_at(geip) is None:
            self.finish(
                "error",
                EXIT_HYPERVISOR_STOP,
                f"full: no emulation for the guest-kernel instruction '{ins.text}' at {geip:#x}",
            )
            return None
        self._virtual_changed()
        if ins.text.startswith("invlpg"):
            # the one page's translations (the processor's TLB keeps the others' until they are flushed)
            self.check_code_mappings(only_page=self.memory_operand(geip) & 0xFFFFF000)
        ev = self.evfast
        if ev is not None and ev.on and self.trace is None and self.outcome is None:
            self._link_event(ev, geip, ins.size, raw)
        return None

    def _link_event(self, ev, geip: int, size: int, raw: bytes) -> None:
        """After a segment load, CR2 read or iretd of the guest kernel served here: from now on the C
        hook serves the site where it can (evfast.py), going on at the next instruction's translation,
        or for an iretd at the one this return reached (none for a return to ring 3)."""
        kind, arg = site_kind(raw)
        if kind == PYTHON or self.direct16.state is not None:
            return
        rt = self.rt
        if kind == INVLPG:
            form = memory_site(raw, geip) if self._fast_kinds & _INVLPG else None
            if form is None or self.outcome is not None:
                return
            rt.link_store = (form, 0, 0)
        if kind != IRETD:
            rt.link_geip = (geip + size) & 0xFFFFFFFF
        elif self.regs.read(R.CS) & 3 == 3:
            rt.link_geip = None
        elif self._entered is not None and self.vcpl() == 0:
            rt.link_geip, arg = self._entered, 1
        else:
            return
        rt.link_as, rt.link_arg = kind, arg

    def _mov_to_cr(self, geip: int, modrm: int) -> int | None:
        """`mov crN, r32` (N = 0, 3, 4) without the instruction emulator: kvm-unit-tests' vmexit
        toggles CR0.WP and CR4.PGE millions of times. The same write_cr, record and coherence check
        as the core's `mov`; the cases that fault or leave protected mode (PE cleared, reserved CR4
        bits) return None and take the core's path. Returns the next guest EIP."""
        n = (modrm >> 3) & 7
        if n not in (0, 3, 4) or self.direct16.state is not None:
            return None
        value = self.regs.read(R.GPR_ORDER[modrm & 7])
        if (n == 0 and not value & CR0_PE) or (n == 4 and value & ~self.virtual_cpu.cr4 & CR4_RESERVED):
            return None
        self.write_cr(n, value)
        self.emulated(geip, "mov", {"cr": n, "value": f"{value:#x}"})
        self._virtual_changed()
        cr = self.crfast
        if cr is not None and self.trace is None:
            cr.arm(self.mmu.strategy)
            self.rt.link_as, self.rt.link_arg = (MOV_CR0, MOV_CR3, MOV_CR3, MOV_CR3, MOV_CR4)[n], modrm
        return (geip + 3) & 0xFFFFFFFF

    def _special(self, geip, ins, site):
        """Callouts the core does not emulate: int n / int3 / into, in/out, cpuid, rdtsc. Returns the
        next guest EIP, None (an event was delivered: EIP is set), or False (not one of them)."""
        raw = site.raw
        key = (site, raw)
        p = self._prefix_len.get(key)
        if p is None:
            p = 0
            while p < len(raw) and raw[p] in (0x66, 0x67, 0xF3, 0xF2, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65, 0xF0):
                p += 1
            if len(self._prefix_len) > 8192:
                self._prefix_len.clear()
            self._prefix_len[key] = p
        op = raw[p]
        regs = self.regs
        nxt = (geip + ins.size) & 0xFFFFFFFF
        if op == 0x0F and raw[p + 1] == 0xA2:
            leaf, subleaf = self._cpuid_in.read()
            if self.trace is None:
                self.tally(self.event_kind, "cpuid")
            else:
                self.record(self.event_kind, "cpuid", None, geip, {"leaf": f"{leaf:#x}"}, "emulated: the CPU model")
            self._cpuid_out.write(*self.machine.cpuid(leaf, subleaf))
            if self.trace is None and self._fast_kinds & _CPUID:
                self.rt.link_as = CPUID  # from now on the C hook answers this site (bt/fastcallout.py)
            return nxt
        if op in (0xCD, 0xCC, 0xCE):
            if op == 0xCE and not regs.read(R.EFLAGS) & 0x800:
                return nxt
            # int3 and into are software interrupts too (gate DPL checked), as the engine reports them
            vector = raw[p + 1] if op == 0xCD else (3 if op == 0xCC else 4)
            detail = {"vector": vector, "software": True}
            if op == 0xCD:  # `int n`: EAX is the system-call number by OS convention
                detail["eax"] = f"{regs.read(R.EAX):#x}"
            self.record("interrupt", f"int {vector:#x}", vector, geip, detail, "delivered through the guest IDT")
            self.deliver(vector, nxt, soft=True, fault_eip=geip)
            return None
        if op in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF):
            size = 1 if op & 1 == 0 else (2 if 0x66 in raw[:p] else 4)
            port = raw[p + 1] if op < 0xE8 else regs.read(R.EDX) & 0xFFFF
            is_in = op in (0xE4, 0xE5, 0xEC, 0xED)
            mask = (1 << (8 * size)) - 1
            if is_in:  # a callout runs at virtual CPL 0 (hook_callout checked it)
                value = self.kernel_port_io(port, size, True) & mask
                eax = regs.read(R.EAX)
                regs.write(R.EAX, (eax & ~mask) | value)
            else:
                self.kernel_port_io(port, size, False, regs.read(R.EAX) & mask)
            if self.outcome is not None:
                return None
            if self.trace is None and self._fast_kinds & _PORTS:
                # from now on the C hook serves this site: time in C, the device through _c_port_in/out
                self.rt.link_as = PORT_IN if is_in else PORT_OUT
                self.rt.link_arg = 0 if op >= 0xE8 else port
                self.rt.link_io = size | (IO_DX if op >= 0xE8 else 0)
            return nxt
        if op == 0x0F and (
            raw[p + 1] in (0x05, 0x07)
            or (
                raw[p + 1] == 0x01 and p + 2 < len(raw) and raw[p + 2] >> 6 == 3 and (raw[p + 2] >> 3) & 7 not in (4, 6)
            )
        ):
            # syscall, sysret, and the 0F 01 register forms this CPU model does not have (vmcall,
            # vmlaunch, monitor, mwait, xgetbv, rdtscp, swapgs...): #UD, as native gives
            self.invalid_opcode(geip)
            return None
        if op == 0xF1:
            # icebp: #DB as a trap (EIP after it), as the engine raises it under native
            self.record("exception", "#DB", 1, geip, {"vector": 1}, "delivered through the guest IDT")
            self.deliver(1, nxt)
            return None
        if op == 0x0F and raw[p + 1] == 0x31:
            if self.trace is None:
                self.tally(self.event_kind, "rdtsc")
            else:
                self.record(self.event_kind, "rdtsc", None, geip, {}, "emulated: the virtual clock")
            now = self.clock.now
            self._rdtsc_out.write(now & 0xFFFFFFFF, (now >> 32) & 0xFFFFFFFF)
            if self.trace is None and self._fast_kinds & _RDTSC:
                self.rt.link_as = RDTSC
            return nxt
        return False

    def _fpu_pointers_to_guest(self, geip: int, raw: bytes) -> None:
        """After the guest kernel's fnstenv/fnsave/fxsave (done natively in the TC): the stored
        x87 instruction pointer is where the last x87 instruction ran, a TC address; it becomes the
        guest EIP it translates, and FCS the guest's selector (SDM Vol. 1 8.1.8, figures 8-9/8-10 for
        the 32-bit protected-mode layouts; table 10-2 for fxsave's)."""
        fx = raw.lstrip(b"\x9b\x2e\x3e\x26\x36\x64\x65")[:1] == b"\x0f"
        fip_at, fcs_at = (8, 12) if fx else (12, 16)
        try:
            addr = self.memory_operand(geip)
            fip, fcs = struct.unpack("<IH", self.read_guest(addr + fip_at, 4) + self.read_guest(addr + fcs_at, 2))
            g = self.tc.guest_eip(fip) if self.tc.in_code(fip) else None
            if g is not None:
                self.write_guest(addr + fip_at, struct.pack("<I", g[0]))
            self.write_guest(addr + fcs_at, struct.pack("<H", self.guest_selector(fcs)))
        except (GuestFault, GuestPageFault, Unsupported):
            return  # the store itself would have faulted first: not reached
        if self.trace is None:
            self._counts[self.event_kind] += 1
        else:
            self.record(
                self.event_kind,
                "fpu_pointers",
                None,
                geip,
                {"fip": f"{fip:#x}"},
                "the stored x87 instruction pointer shown as the guest's",
            )
