"""The C hooks (virtual clock, native TLB fill and event delivery, CPUID, full's callout slots, hw's EPT fill, APIC-access page and CPUID/CR exits, trap's common traps, para's common events), and the guest sources shipped inside the package; metadata is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

GUESTS = Path(__file__).resolve().parent / "guests"


class build_py_with_guests(build_py):
    """A wheel or a plain `pip install .` carries the bundled guests and their includes (as
    cpuvirt/_guests), so `cpuvirt guests` and `cpuvirt run hello` work without the repository.
    An editable install reads guests/ in the checkout instead (cpuvirt/toolchain/build.py)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "cpuvirt" / "_guests"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(GUESTS, target, ignore=shutil.ignore_patterns("build", "__pycache__"))


setup(
    ext_modules=[Extension("cpuvirt.engine._vclock", ["cpuvirt/engine/_vclock.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_vclock.h", "cpuvirt/engine/_got.h"]),
                 Extension("cpuvirt.memory._tlbfill", ["cpuvirt/memory/_tlbfill.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_tlbhook.h", "cpuvirt/memory/_shadowmirror.h", "cpuvirt/engine/_got.h"]),
                 Extension("cpuvirt.engine._cpuid", ["cpuvirt/engine/_cpuid.c"], extra_compile_args=["-O2"]),
                 Extension("cpuvirt.cpu._delivery", ["cpuvirt/cpu/_delivery.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_tlbhook.h", "cpuvirt/memory/_shadowmirror.h", "cpuvirt/cpu/_blockcopy.h", "cpuvirt/cpu/_modrm.h",
                                    "cpuvirt/engine/_vclock.h"]),
                 Extension("cpuvirt.cpu._iogate", ["cpuvirt/cpu/_iogate.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_vclock.h"]),
                 Extension("cpuvirt.cpu._ssealign", ["cpuvirt/cpu/_ssealign.c"], extra_compile_args=["-O2"]),
                 Extension("cpuvirt.modes.hw._apicv", ["cpuvirt/modes/hw/_apicv.c"], extra_compile_args=["-O2"]),
                 Extension("cpuvirt.bt._callout", ["cpuvirt/bt/_callout.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_tlbhook.h", "cpuvirt/cpu/_evseg.h", "cpuvirt/cpu/_evdeliver.h", "cpuvirt/cpu/_blockcopy.h",
                                    "cpuvirt/memory/_shadowmirror.h", "cpuvirt/cpu/_storeop.h", "cpuvirt/engine/_vclock.h", "cpuvirt/cpu/_truefault.h",
                                    "cpuvirt/cpu/_modrm.h"]),
                 Extension("cpuvirt.modes.hw._fastexit", ["cpuvirt/modes/hw/_fastexit.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_vclock.h", "cpuvirt/memory/_shadowmirror.h", "cpuvirt/cpu/_modrm.h",
                                    "cpuvirt/engine/_tlbhook.h", "cpuvirt/cpu/_storeop.h", "cpuvirt/cpu/_truefault.h"]),
                 Extension("cpuvirt.modes._trapfast", ["cpuvirt/modes/_trapfast.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_tlbhook.h", "cpuvirt/cpu/_evseg.h", "cpuvirt/cpu/_evdeliver.h", "cpuvirt/cpu/_blockcopy.h",
                                    "cpuvirt/memory/_shadowmirror.h", "cpuvirt/cpu/_modrm.h",
                                    "cpuvirt/cpu/_storeop.h", "cpuvirt/engine/_vclock.h", "cpuvirt/cpu/_truefault.h"]),
                 Extension("cpuvirt.modes.para._pvfast", ["cpuvirt/modes/para/_pvfast.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_vclock.h"]),
                 Extension("cpuvirt.machine._apicmmio", ["cpuvirt/machine/_apicmmio.c"], extra_compile_args=["-O2"],
                           depends=["cpuvirt/engine/_vclock.h"])],
    cmdclass={"build_py": build_py_with_guests},
)
