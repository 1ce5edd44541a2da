"""Mode `para`: a paravirtualized kernel at ring 1 under a Xen-style hypervisor (docs/pv-abi.md).

The guest was modified to ask instead of executing privileged instructions: hypercalls through a
hypercall page (`hypercalls.py`), events through a virtual trap table and event-channel upcalls
(`vcpu.py`, `events.py`), direct paging with typed, reference-counted frames (memory/direct.py).
It is fast because nothing is intercepted but what the guest asks for; it runs only modified guests.
"""

from __future__ import annotations

import os
import struct

from cpuvirt.engine import regs as R
from cpuvirt.engine.internals import PageFlush
from cpuvirt.memory.direct import HYPERCALL, L2, DirectPaging
from cpuvirt.memory.fastfill import DirectFastFill
from cpuvirt.memory.p2m import RAM_HPA
from cpuvirt.memory.types import PTE_A, PTE_D, PTE_P, PTE_RW, PTE_US
from cpuvirt.modes.base import Mode
from cpuvirt.modes.para import startinfo as S
from cpuvirt.modes.para.events import EventChannels
from cpuvirt.modes.para.vcpu import ParaVcpu

PAGE = 0x1000


class ParaMode(Mode):
    name = "para"
    description = "paravirtualized kernel at ring 1: Xen-style hypercalls, upcalls, direct paging"
    vcpu: ParaVcpu

    def __init__(self, machine, trace=None, max_insns: int = 0):
        self.machine = machine
        self.nr_pages = machine.mem_bytes >> 12
        self.paging = DirectPaging(machine.mmu, self.nr_pages, RAM_HPA)
        self.vcpu = ParaVcpu(machine, self.paging, trace=trace, max_insns=max_insns)
        fast = DirectFastFill.install(machine.mmu)  # before Mmu.fill's hook: the common fills in C
        if fast is not None:
            self.paging.on_window = fast.window  # the GDT and LDT frames it shows, for the C fill
        self.vcpu.install_hooks()
        self.top = 0x100000
        self.cmdline = b""
        self.module: tuple[int, int] | None = None  # the first Multiboot module: (start, end)
        self.layout: S.Layout | None = None

    def set_image(self, image, boot) -> None:
        """What the loader placed (the PV pages go above it): called by the runner before boot()."""
        top = image.highest
        for gpa, blob in boot.blobs:
            top = max(top, gpa + len(blob)) if gpa >= image.lowest else top
        self.top = max(top, boot.end if boot.end else 0)
        self.cmdline = (boot.cmdline or "").encode("latin-1", "replace")
        self.module = (boot.modules[0][0], boot.modules[0][1]) if boot.modules else None

    def mfn(self, gpa: int) -> int:
        return (RAM_HPA + gpa) >> 12

    def boot(self) -> None:
        m, vcpu, paging = self.machine, self.vcpu, self.paging
        lay = self.layout = S.Layout.plan(self.top, self.nr_pages)
        if lay.first_free > m.mem_bytes:
            from cpuvirt.errors import CpuvirtError

            raise CpuvirtError(f"para: no room above the image ({lay.start_info:#x}) for the PV start pages")
        regs = m.regs
        mbi = regs.read(R.EBX)
        m.write_gpa(lay.start_info, S.start_info(lay, self.nr_pages, self.mfn, mbi, self.cmdline, self.module))
        m.write_gpa(lay.shared_info, S.shared_info())
        m.write_gpa(lay.hypercall, S.hypercall_page())
        m.write_gpa(lay.gdt, S.boot_gdt())
        first_mfn = RAM_HPA >> 12
        m.write_gpa(lay.mfn_list, struct.pack(f"<{self.nr_pages}I", *range(first_mfn, first_mfn + self.nr_pages)))
        # Initial page tables: all RAM 1:1, 4 KiB pages; the frames that must stay read-only are.
        readonly = {lay.hypercall >> 12, lay.gdt >> 12, lay.l2 >> 12} | {a >> 12 for a in lay.l1}
        for i, l1 in enumerate(lay.l1):
            ents = []
            for pfn in range(i * 1024, (i + 1) * 1024):
                if pfn >= self.nr_pages:
                    ents.append(0)
                elif pfn in readonly:
                    ents.append((self.mfn(pfn << 12) << 12) | PTE_P | PTE_US | PTE_A)
                else:
                    ents.append((self.mfn(pfn << 12) << 12) | PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)
            m.write_gpa(l1, struct.pack("<1024I", *ents))
        pdes = [(self.mfn(a) << 12) | PTE_P | PTE_RW | PTE_US | PTE_A for a in lay.l1]
        m.write_gpa(lay.l2, struct.pack("<1024I", *(pdes + [0] * (1024 - len(pdes)))))
        # Types: the hypercall page forever, the boot GDT until replaced, then the tables validated.
        hp = self.mfn(lay.hypercall) - paging.base_mfn
        paging.type[hp], paging.count[hp] = HYPERCALL, 1
        paging.set_gdt([self.mfn(lay.gdt)])
        paging.new_baseptr(self.mfn(lay.l2))
        paging.pin(self.mfn(lay.l2), L2)
        paging.on_flush = vcpu.flush_tlb
        if os.environ.get("CPUVIRT_INVLPG_FLUSHES_ALL", "0") == "0":  # 1: an INVLPG flushes the whole TLB
            paging.on_flush_page = PageFlush.of(m.mmu.uc)
        m.mmu.strategy = paging
        m.mmu.dma_guard = paging.dma_refusal  # devices (virtio) never write typed frames

        vcpu.events = EventChannels(m.ram, RAM_HPA + lay.shared_info)
        vcpu.shared_info_ma = RAM_HPA + lay.shared_info  # its machine address (direct paging)
        vcpu.hypercall_va = lay.hypercall
        if vcpu.pv_fast is not None:
            vcpu.pv_fast.set_shared_info(vcpu.events, lay.hypercall)
            vcpu.pv_fast.set_paging(paging)
        regs.set_table(R.GDTR, (0, 0xFC000000, len(S.BOOT_GDT) * 8 - 1, 0))
        regs.write(R.CR4, 0x10)
        regs.write(R.CR3, paging.base)
        regs.write(R.CR0, 0x80010033)
        for seg in (R.DS, R.ES, R.FS, R.GS):
            regs.write(seg, S.FLAT_RING1_DS)
        self._enter_ring1(lay)

    def _enter_ring1(self, lay) -> None:
        """The engine reaches CPL 1 only through an `iretd`: run the hypercall page's one, once."""
        m, regs = self.machine, self.machine.regs
        stack_top = lay.stack + PAGE
        frame = struct.pack("<5I", 0, S.FLAT_RING1_CS, 0x202, stack_top, S.FLAT_RING1_DS)
        esp = stack_top - len(frame)
        m.write_gpa(esp, frame)
        regs.write(R.ESP, esp)
        eax, ebx = regs.read(R.EAX), regs.read(R.EBX)
        now = m.clock.now
        stub = lay.hypercall + S.IRET_STUB
        observer, m.block_observer = m.block_observer, None  # the hypervisor's own iretd: no intercept
        m.uc.emu_start(stub, 0, 0, 1)
        m.block_observer = observer
        # The guest's HYPERVISOR_iret returns through the same iretd, which must be intercepted like
        # any other (RF and VM in its image): the clock counted its block unseen, so it is shown to the
        # intercepts here and translated again with its hook.
        ic = self.vcpu.intercepts
        if ic is not None:
            code = m.mmu.fetch_bytes(stub, 1) or b""
            if ic.check_code(stub, code):
                m.uc.ctl_remove_cache(stub, stub + len(code))
        m.clock.now = now
        if regs.cpl() != 1:
            raise RuntimeError("para: could not enter ring 1")
        regs.write(R.EAX, eax)
        regs.write(R.EBX, ebx)
        regs.write(R.ESI, lay.start_info)
        self.entry_frame = esp

    def run(self, entry: int):
        self.vcpu.time_port_io_in_c()  # in/out within the granted IOPL: their time in C (none with a trace)
        if self.vcpu.pv_fast is not None:
            self.vcpu.pv_fast.start()  # the bounce and HYPERVISOR_iret in C (none with a trace)
        return self.vcpu.run(entry)
