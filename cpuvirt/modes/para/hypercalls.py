"""The hypercall table, indexed by Xen's numbers (xen.h), like KVM's exit-handler table.

Each handler takes the ParaVcpu, reads only the argument registers it needs, and returns the value
for EAX (a negative errno on failure) or None when it set the guest's registers itself (iret). A
handler may put the decoded arguments in `cpu.detail` for the trace (only when one is written).
"""

from __future__ import annotations

import struct

from cpuvirt.engine import regs as R
from cpuvirt.memory.direct import L1, L2, Refused
from cpuvirt.modes.para.events import VIRQ_TIMER
from cpuvirt.modes.para.startinfo import CONSOLE_PORT, IRET_STUB
from cpuvirt.x86.flags import EFLAGS_IF
from cpuvirt.xen import (
    EEXIST,
    EFAULT,
    EINVAL,
    ENOENT,
    ENOSYS,
    EPERM,
    GDT_WINDOW_FRAMES,
    HYPERVISOR_VIRT_START,
    LDT_VIRT_START,
)

DOMID_SELF = 0x7FF0
CONSOLEIO_write, CONSOLEIO_read = 0, 1
SCHEDOP_yield, SCHEDOP_block, SCHEDOP_shutdown = 0, 1, 2
SHUTDOWN_poweroff, SHUTDOWN_crash = 0, 3
MMU_NORMAL_PT_UPDATE = 0
MMUEXT_PIN_L1_TABLE, MMUEXT_PIN_L2_TABLE, MMUEXT_UNPIN_TABLE, MMUEXT_NEW_BASEPTR = 0, 1, 4, 5
MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_INVLPG_LOCAL, MMUEXT_SET_LDT = 6, 7, 13
UVMF_TLB_FLUSH, UVMF_INVLPG, UVMF_FLUSHTYPE_MASK = 1, 2, 3  # update_va_mapping's flags (xen.h)
EVTCHNOP_bind_virq, EVTCHNOP_close, EVTCHNOP_send, EVTCHNOP_unmask = 1, 3, 4, 9
PHYSDEVOP_set_iopl = 6
XENVER_version = 0
XEN_VERSION = 0x00040011
MAX_BATCH = 1 << 16
ENOSPC = 28
MMU_UPDATE_PREEMPTED = 1 << 31  # xen.h: set in `count` when a batch is continued (hypercall continuation)

# The cost model (docs/security.md, "Bounds"): the hypervisor's work for a hypercall is charged to
# the guest's virtual-cycle budget, in proportion to what was done, so a guest cannot make the host
# spend time the budget does not pay for. One unit of Python work (about 0.2-1 us of host time) is
# charged about as much virtual time, as a port access is (IO_CYCLES).
HYPERCALL_CYCLES = 1000  # every hypercall: the trap into the hypervisor and back
REQUEST_CYCLES = 100  # each mmu_update / mmuext_op request examined
ENTRY_CYCLES = 100  # each page-table entry validated or released (a full L1: 1024)
CONSOLE_BYTE_CYCLES = 100  # each byte console_io writes
PREEMPT_WORK = 1 << 16  # entries: a batch that did this much is continued (Xen's
# hypercall_preempt_check): the guest re-issues the rest
_MMUEXT_NAMES = {
    0: "PIN_L1_TABLE",
    1: "PIN_L2_TABLE",
    4: "UNPIN_TABLE",
    5: "NEW_BASEPTR",
    6: "TLB_FLUSH_LOCAL",
    7: "INVLPG_LOCAL",
    13: "SET_LDT",
}


def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


def set_trap_table(cpu) -> int:
    table = cpu.a[0]
    if table == 0:
        cpu.trap_table.clear()
        cpu.note(table="NULL (cleared)")
        return 0
    set_: list[str] = []
    for i in range(257):
        vector, flags, cs, address = struct.unpack("<BBHI", cpu.gread(table + 8 * i, 8))
        if address == 0:
            break
        if vector == 0x82:
            cpu.note(entries=set_, refused=f"vector {vector:#x} is the hypercall vector (the hypervisor's)")
            return -EPERM
        why = cpu.check_code_selector(cs)
        if why:
            cpu.note(entries=set_, refused=f"vector {vector:#x}: {why}")
            return -EINVAL
        cpu.trap_table[vector] = (flags, (cs & ~3) | 1, address)
        set_.append(f"{vector:#x}->{cs:#x}:{address:#x}/{flags}")
    else:
        return -EINVAL
    cpu.trap_table_set = True
    cpu.note(table=f"{table:#x}", entries=set_)
    return 0


def _batch_start(cpu, count: int, done_ptr: int) -> tuple[int, int]:
    """(count without the continuation flag, requests done by the earlier parts of this batch)."""
    if not count & MMU_UPDATE_PREEMPTED:
        return count, 0
    count &= ~MMU_UPDATE_PREEMPTED
    if not done_ptr:
        return count, 0
    return count, struct.unpack("<I", cpu.gread(done_ptr, 4))[0]


def _preempted(cpu, nr: int, item: int, i: int, count: int, done: int, done_ptr: int) -> bool:
    """After request i of a batch: if the batch has done PREEMPT_WORK entries and requests remain,
    continue it as Xen does (hypercall_create_continuation): the arguments are advanced, EIP goes
    back to the `int 0x82`, and the guest re-issues the rest (timers and the budget are checked
    in between). True when the batch was continued."""
    if i + 1 >= count or cpu.paging.work < PREEMPT_WORK:
        return False
    regs = cpu.regs
    if done_ptr:
        cpu.gwrite(done_ptr, struct.pack("<I", done))
    regs.write(R.EAX, nr)
    regs.write(R.EBX, _u32(cpu.a[0] + item * (i + 1)))
    regs.write(R.ECX, (count - i - 1) | MMU_UPDATE_PREEMPTED)
    regs.write(R.EIP, _u32(regs.read(R.EIP) - 2))
    cpu.note(preempted_after=i + 1, continued=count - i - 1)
    return True


def mmu_update(cpu) -> int | None:
    req, count, done_ptr, dom = cpu.a[0], cpu.a[1], cpu.a[2], cpu.a[3]
    if dom != DOMID_SELF:
        cpu.note(domid=dom, refused="only DOMID_SELF")
        return -EPERM
    count, done = _batch_start(cpu, count, done_ptr)
    if count > MAX_BATCH:
        return -EINVAL
    rc, log = 0, list[str]()
    try:
        for i in range(count):
            cpu.charge(REQUEST_CYCLES)
            ptr, val = struct.unpack("<QQ", cpu.gread(req + 16 * i, 16))
            if ptr & 3 != MMU_NORMAL_PT_UPDATE:
                raise Refused(ENOSYS, f"command {ptr & 3} (only MMU_NORMAL_PT_UPDATE)")
            if val >> 32:
                raise Refused(EINVAL, f"val {val:#x} has high bits (non-PAE: 32-bit entries)")
            if ptr >> 32:
                raise Refused(EPERM, f"ptr {ptr:#x} is above 4 GiB")
            kind = cpu.paging.update_entry(ptr & ~3, val)
            done += 1
            if cpu.trace is not None and len(log) < 16:
                log.append(f"[{ptr & ~3:#x}] = {val:#x} ({kind})")
            if _preempted(cpu, 1, 16, i, count, done, done_ptr):
                cpu.note(req=f"{req:#x}", count=count, done=done, updates=log)
                return None
    except Refused as r:
        rc = -r.errno
        cpu.refused(r.why)
    cpu.note(req=f"{req:#x}", count=count, done=done, updates=log)
    if done_ptr:
        try:
            cpu.gwrite(done_ptr, struct.pack("<I", done))
        except Refused:
            return -EFAULT
    return rc


def set_gdt(cpu) -> int:
    regs = cpu.regs
    frames_va, entries = cpu.a[0], cpu.a[1]
    cpu.note(frame_list=f"{frames_va:#x}", entries=entries)
    if not 1 <= entries <= GDT_WINDOW_FRAMES * 512:
        return cpu.refuse(EINVAL, f"{entries} entries (1..{GDT_WINDOW_FRAMES * 512})")
    nframes = (entries + 511) // 512
    mfns = list(struct.unpack(f"<{nframes}I", cpu.gread(frames_va, 4 * nframes)))
    paging = cpu.paging
    ram = cpu.machine.ram
    try:
        for mfn in mfns:
            paging.pfn(mfn)
    except Refused as r:
        return cpu.refuse(r.errno, r.why)
    for n in range(entries):
        mfn = mfns[n // 512]
        d = struct.unpack_from("<Q", ram.buf, (mfn << 12) - ram.hpa + (n % 512) * 8)[0]
        why = _check_descriptor(d)
        if why:
            return cpu.refuse(EINVAL, f"descriptor {n} (selector {n * 8:#x}) = {d:#018x}: {why}")
    try:
        paging.set_gdt(mfns)
    except Refused as r:
        return cpu.refuse(r.errno, r.why)
    _set_accessed(ram, mfns, entries)
    regs.set_table(R.GDTR, (0, HYPERVISOR_VIRT_START, entries * 8 - 1, 0))
    cpu.note(frames=[f"{m:#x}" for m in mfns])
    return 0


def _set_ldt(cpu, va: int, entries: int) -> None:
    """MMUEXT_SET_LDT: the LDT's pages (read-only, the guest's) are shown at LDT_VIRT_START."""
    paging = cpu.paging
    if entries == 0:
        paging.set_ldt([])
        cpu.regs.set_table(R.LDTR, (0, 0, 0, 0))
        return
    if va & 0xFFF or entries > GDT_WINDOW_FRAMES * 512 or va + entries * 8 > HYPERVISOR_VIRT_START:
        raise Refused(EINVAL, f"SET_LDT {va:#x}, {entries} entries: not page-aligned or too large")
    mfns = []
    for page in range((entries * 8 + 0xFFF) >> 12):
        ma, _ = paging.gva_to_gpa(va + (page << 12), 0, False, False)
        if ma is None:
            raise Refused(EINVAL, f"SET_LDT: {va + (page << 12):#x} is not mapped")
        mfns.append(ma >> 12)
    ram = cpu.machine.ram
    for n in range(entries):
        d = struct.unpack_from("<Q", ram.buf, (mfns[n // 512] << 12) - ram.hpa + (n % 512) * 8)[0]
        why = _check_descriptor(d)
        if why:
            raise Refused(EINVAL, f"LDT descriptor {n} (selector {n * 8 + 4:#x}) = {d:#018x}: {why}")
    paging.set_ldt(mfns)
    _set_accessed(ram, mfns, entries)
    cpu.regs.set_table(R.LDTR, (0, LDT_VIRT_START, entries * 8 - 1, 0x8200))


def _set_accessed(ram, mfns, entries) -> None:
    """The CPU would set the accessed bit in a read-only table: set it first."""
    for n in range(entries):
        off = (mfns[n // 512] << 12) - ram.hpa + (n % 512) * 8
        hi = struct.unpack_from("<I", ram.buf, off + 4)[0]
        if hi & 0x8000 and hi & 0x1000:
            struct.pack_into("<I", ram.buf, off + 4, hi | 0x100)


def _check_descriptor(d: int) -> str:
    if not d >> 47 & 1:
        return ""
    if not d >> 44 & 1:
        return "a system descriptor (TSS, LDT or gate): not allowed in a PV GDT"
    if (d >> 45) & 3 == 0:
        return "DPL 0: no descriptor may be above ring 1"
    return ""


def stack_switch(cpu) -> int:
    ss, esp = cpu.a[0], cpu.a[1]
    cpu.note(ss=f"{ss:#x}", esp=f"{esp:#x}")
    why = cpu.check_stack_selector(ss)
    if why:
        return cpu.refuse(EINVAL, why)
    cpu.kernel_stack = (ss, esp)
    return 0


def set_callbacks(cpu) -> int:
    ev_cs, ev_eip, fs_cs, fs_eip = cpu.a[0], cpu.a[1], cpu.a[2], cpu.a[3]
    cpu.note(event=f"{ev_cs:#x}:{ev_eip:#x}", failsafe=f"{fs_cs:#x}:{fs_eip:#x}")
    why = cpu.check_code_selector(ev_cs) or (fs_cs and cpu.check_code_selector(fs_cs))
    if why:
        return cpu.refuse(EINVAL, why)
    cpu.event_callback = ((ev_cs & ~3) | 1, ev_eip)
    cpu.failsafe_callback = ((fs_cs & ~3) | 1, fs_eip)
    return 0


def update_va_mapping(cpu) -> int:
    va, lo, hi, flags = cpu.a[0], cpu.a[1], cpu.a[2], cpu.a[3]
    cpu.note(va=f"{va:#x}", val=f"{hi:#x}{lo:08x}" if hi else f"{lo:#x}", flags=flags)
    try:
        if hi:
            raise Refused(EINVAL, "high 32 bits set (non-PAE: 32-bit entries)")
        ptr = cpu.paging.l1_entry_for(va)
        kind = cpu.paging.update_entry(ptr, lo, va)
        if flags & UVMF_FLUSHTYPE_MASK == UVMF_INVLPG:
            cpu.paging.flush_page(va)
        elif flags & UVMF_FLUSHTYPE_MASK:  # UVMF_TLB_FLUSH (and 3, which Xen leaves undefined)
            cpu.paging.flush()
    except Refused as r:
        return cpu.refuse(r.errno, r.why)
    cpu.note(entry=f"{ptr:#x}", kind=kind)
    return 0


def set_timer_op(cpu) -> int:
    t = cpu.a[0] | cpu.a[1] << 32
    cpu.note(timeout=t, now=cpu.clock.now)
    cpu.set_timer(t or None)
    return 0


def xen_version(cpu) -> int:
    cmd = cpu.a[0]
    if cpu.detail is not None:
        cpu.detail["cmd"] = cmd
    return XEN_VERSION if cmd == XENVER_version else -ENOSYS


def console_io(cpu) -> int:
    cmd = cpu.a[0]
    if cmd == CONSOLEIO_read:
        return 0
    if cmd != CONSOLEIO_write:
        return -EINVAL
    count, buf = cpu.a[1], cpu.a[2]
    if count > 1 << 20:
        return cpu.refuse(EINVAL, f"count {count} too large")
    data = cpu.gread(buf, count)
    cpu.charge(CONSOLE_BYTE_CYCLES * count)
    cpu.note(count=count, buffer=f"{buf:#x}")
    out = cpu.machine.uart.on_output
    for b in data:
        out(b)
    return count


def iret(cpu) -> None:
    """struct iret_context { eax, eip, cs, eflags, [esp, ss] } at ESP (the slot pushed EAX)."""
    regs = cpu.regs
    esp = regs.read(R.ESP)
    try:
        eax, eip, cs, eflags = struct.unpack("<4I", cpu.gread(esp, 16))
    except Refused:
        cpu.crash(f"iret: the frame at {esp:#x} is not readable")
        return
    cpu.events.mask = 0 if eflags & EFLAGS_IF else 1
    cpu.note(eip=f"{eip:#x}", cs=f"{cs & 0xFFFF:#x}", eflags=f"{eflags:#x}")
    regs.write(R.EAX, eax)
    regs.write(R.ESP, _u32(esp + 4))
    regs.write(R.EIP, cpu.hypercall_va + IRET_STUB)  # the engine's iretd does the rest, checks included
    return


def mmuext_op(cpu) -> int | None:
    ops, count, done_ptr, dom = cpu.a[0], cpu.a[1], cpu.a[2], cpu.a[3]
    if dom != DOMID_SELF:
        return cpu.refuse(EPERM, "only DOMID_SELF")
    count, done = _batch_start(cpu, count, done_ptr)
    if count > MAX_BATCH:
        return -EINVAL
    paging = cpu.paging
    rc, log = 0, list[str]()
    try:
        for i in range(count):
            cpu.charge(REQUEST_CYCLES)
            cmd, arg1, arg2 = struct.unpack("<III", cpu.gread(ops + 12 * i, 12))
            if cmd == MMUEXT_PIN_L1_TABLE:
                paging.pin(arg1, L1)
            elif cmd == MMUEXT_PIN_L2_TABLE:
                paging.pin(arg1, L2)
            elif cmd == MMUEXT_UNPIN_TABLE:
                paging.unpin(arg1)
            elif cmd == MMUEXT_NEW_BASEPTR:
                paging.new_baseptr(arg1)  # CR3 is written by the flush at the end
            elif cmd == MMUEXT_TLB_FLUSH_LOCAL:
                paging.flush()
            elif cmd == MMUEXT_INVLPG_LOCAL:
                paging.flush_page(arg1)  # arg1: linear_addr
            elif cmd == MMUEXT_SET_LDT:
                _set_ldt(cpu, arg1, arg2)
            else:
                raise Refused(ENOSYS, f"mmuext command {cmd}")
            done += 1
            if cpu.trace is not None and len(log) < 16:
                log.append(f"{_MMUEXT_NAMES.get(cmd, cmd)} {arg1:#x}")
            if _preempted(cpu, 26, 12, i, count, done, done_ptr):
                cpu.note(ops=log, count=count, done=done)
                return None
    except Refused as r:
        rc = -r.errno
        cpu.refused(r.why)
    cpu.note(ops=log, count=count, done=done)
    if done_ptr:
        try:
            cpu.gwrite(done_ptr, struct.pack("<I", done))
        except Refused:
            return -EFAULT
    return rc


def sched_op(cpu) -> int | None:
    cmd = cpu.a[0]
    if cmd == SCHEDOP_yield:
        return 0
    if cmd == SCHEDOP_block:
        cpu.note(cmd="block")
        return cpu.block()
    if cmd == SCHEDOP_shutdown:
        reason = struct.unpack("<I", cpu.gread(cpu.a[1], 4))[0]
        cpu.note(cmd="shutdown", reason=reason)
        if reason == SHUTDOWN_poweroff:
            cpu.shutdown(0, "SHUTDOWN_poweroff")
        elif reason == SHUTDOWN_crash:
            cpu.shutdown(1, "SHUTDOWN_crash")
        else:
            return cpu.refuse(EINVAL, f"shutdown reason {reason} (poweroff 0 and crash 3 only)")
        return 0
    return -ENOSYS


def event_channel_op(cpu) -> int:
    cmd, arg = cpu.a[0], cpu.a[1]
    ev = cpu.events
    if cmd == EVTCHNOP_bind_virq:
        virq, vcpu = struct.unpack("<II", cpu.gread(arg, 8))
        cpu.note(cmd="bind_virq", virq=virq, vcpu=vcpu)
        if virq != VIRQ_TIMER:
            return cpu.refuse(EINVAL, f"VIRQ {virq} (only VIRQ_TIMER)")
        if vcpu != 0:
            return cpu.refuse(ENOENT, f"vcpu {vcpu}")
        if virq in ev.virq_port:
            return cpu.refuse(EEXIST, "VIRQ_TIMER is already bound")
        cpu.gwrite(arg + 8, struct.pack("<I", 0))  # -EFAULT before binding anything
        port = ev.bind_virq(virq)
        if port is None:
            return cpu.refuse(ENOSPC, "no free event channel port")
        cpu.gwrite(arg + 8, struct.pack("<I", port))
        cpu.note(port=port)
        return 0
    if cmd in (EVTCHNOP_close, EVTCHNOP_send, EVTCHNOP_unmask):
        port = struct.unpack("<I", cpu.gread(arg, 4))[0]
        cpu.note(cmd={3: "close", 4: "send", 9: "unmask"}[cmd], port=port)
        if cmd == EVTCHNOP_send:
            return 0 if port == CONSOLE_PORT else cpu.refuse(EINVAL, f"send on port {port}")
        if cmd == EVTCHNOP_close:
            return 0 if ev.close(port) else cpu.refuse(EINVAL, f"port {port} is not bound")
        if not 0 < port < 1024:
            return cpu.refuse(EINVAL, f"port {port}")
        ev.unmask(port)
        return 0
    return -ENOSYS


def physdev_op(cpu) -> int:
    cmd, arg = cpu.a[0], cpu.a[1]
    if cmd != PHYSDEVOP_set_iopl:
        return -ENOSYS
    iopl = struct.unpack("<I", cpu.gread(arg, 4))[0]
    cpu.note(cmd="set_iopl", iopl=iopl)
    if iopl > 3:
        return cpu.refuse(EINVAL, f"iopl {iopl}")
    cpu.iopl = iopl
    return 0


def _enosys(cpu) -> int:
    return -ENOSYS


HYPERCALLS = {
    0: ("set_trap_table", set_trap_table),
    1: ("mmu_update", mmu_update),
    2: ("set_gdt", set_gdt),
    3: ("stack_switch", stack_switch),
    4: ("set_callbacks", set_callbacks),
    13: ("multicall", _enosys),
    14: ("update_va_mapping", update_va_mapping),
    15: ("set_timer_op", set_timer_op),
    17: ("xen_version", xen_version),
    18: ("console_io", console_io),
    23: ("iret", iret),
    26: ("mmuext_op", mmuext_op),
    29: ("sched_op", sched_op),
    32: ("event_channel_op", event_channel_op),
    33: ("physdev_op", physdev_op),
}
