"""Lab 6: paravirtual I/O: the trip of one frame through a virtio-net device's split virtqueues, what it costs
in each CPU mode against an emulated serial port, and who serves the rings (device model, vhost worker,
vhost-user process)."""

from collections import Counter

from cpuvirt.labs import Lab, Output, Question, Step


def _card(name: str):
    def observe(out: Output) -> dict:
        s = out.summary(f"{name}.json")
        card = s["devices"][0]
        exits = sum(row[2] for row in s["exit_stats"])
        obs = {
            f"{name}_{k}": card[k]
            for k in ("tx_frames", "rx_frames", "notifications", "interrupts", "tx_dropped", "rx_dropped")
        }
        obs[f"{name}_exits"] = exits or sum(s["counts"].get(k, 0) for k in ("trap", "callout", "io"))
        obs[f"{name}_pass"] = len(out.lines("PASS "))
        return obs

    return observe


def _story(out: Output) -> dict:
    kinds = Counter(e["reason"] for e in out.events("frame.jsonl") if e["kind"] == "virtio")
    return {
        "story_notify": kinds.get("NOTIFY", 0),
        "story_tx": kinds.get("TX", 0),
        "story_rx": kinds.get("RX", 0),
        "story_irq": kinds.get("INTERRUPT", 0),
    }


def _exits(name: str):
    def observe(out: Output) -> dict:
        s = out.summary(f"{name}.json")
        return {f"{name}_exits": sum(row[2] for row in s["exit_stats"])}

    return observe


def _backend(name: str):
    def observe(out: Output) -> dict:
        s = out.summary(f"{name}.json")
        events = [e for e in out.events(f"{name}.jsonl") if e["kind"] == "virtio"]
        notify = next(e for e in events if e["reason"] == "NOTIFY")
        return {
            f"{name}_exits": sum(row[2] for row in s["exit_stats"]),
            f"{name}_notify": notify["action"],
            f"{name}_used": sum(e["reason"] == "USED" for e in events),
        }

    return observe


LAB = Lab(
    name="virtio",
    title="Paravirtual I/O: one frame's trip through virtio-net",
    goals=[
        "Follow a guest driver finding a PCI device and initialising a virtio device step by step.",
        "Trace one frame: descriptor, available ring, notification, device, used ring, interrupt.",
        "Measure why paravirtual I/O exists: exits per frame against the same bytes through an emulated UART.",
        "See where the backend lives (device model, vhost worker, vhost-user process) and what changes with it.",
    ],
    background="""
An emulated device makes the guest pay for every register access: sending one byte through the 16550
UART is a port write, and under a hypervisor every port write is an exit (a trap, a callout, a VM exit).
A **paravirtual** device is designed for a hypervisor instead. In **virtio**, the driver and the device
share **virtqueues** in guest memory: a table of **descriptors** (guest-physical address, length, flags),
an **available ring** where the driver posts descriptor chains, and a **used ring** where the device
returns them. The driver writes a whole frame into memory, posts it, and only then tells the device with
one register write (the **notification**, or kick); the device answers with one **interrupt** for many
completed buffers. With EVENT_IDX each side can also say when it wants to be told at all.

cpuvirt models a legacy (virtio 0.9.5 / "transitional") virtio-net PCI device as QEMU's
`virtio-net-pci,disable-modern=on`: the guest finds it by scanning PCI bus 0 through ports 0xCF8/0xCFC.
The bundled guest `netdemo` is a small driver: it sends an ARP request, a ping to 10.0.2.2, a chained
frame, an indirect one and a burst of 300 frames. With `peer=user` the device's other end answers ARP and
ping as QEMU's user network does. docs/virtio.md draws the rings.
""",
    steps=[
        Step(
            "cpuvirt run netdemo --device virtio-net,peer=user --trace frame.jsonl --summary native.json",
            "Run the driver natively with a virtio-net card whose peer answers like QEMU's user network.",
            _card("native"),
            "{native_pass} PASS. The card sent {native_tx_frames} frames and received {native_rx_frames} with "
            "only {native_notifications} notifications and {native_interrupts} interrupts: one kick covers many "
            "frames.",
            show_lines=24,
        ),
        Step(
            "cpuvirt trace show frame.jsonl --kind pci --kind virtio",
            "Read the trace from the top: the PCI scan (configuration reads, BAR sizing), the initialisation "
            "(reset, ACKNOWLEDGE, DRIVER, features, each queue's size and page frame, DRIVER_OK), then frames.",
            _story,
            "{story_notify} NOTIFY events, {story_tx} TX, {story_rx} RX and {story_irq} INTERRUPT events "
            "in the whole run.",
            show_lines=40,
        ),
        Step(
            "cpuvirt run netdemo --device virtio-net --append bench -q --mode hw --stats --summary hw.json",
            "The same frames under VT-x (`bench`: no line per frame, so the console adds few exits).",
            _card("hw"),
            "{hw_exits} VM exits for {hw_tx_frames} frames out and {hw_rx_frames} in.",
            show_lines=8,
        ),
        Step(
            "cpuvirt run netdemo --device virtio-net --append 'bench com1' -q --mode hw --stats --summary com1.json",
            "Now the same bytes through COM1, one port write per byte (netdemo's `com1` bench; its console "
            "output is the raw frames, so it is not shown here).",
            _exits("com1"),
            "{com1_exits} VM exits, against {hw_exits} through virtio-net.",
            show_lines=0,
        ),
        Step(
            "cpuvirt run netdemo --device virtio-net --append bench -q --mode trap --summary trap.json",
            "And under trap-and-emulate, where every port access of the driver is a trap.",
            _card("trap"),
            "{trap_pass} PASS with {trap_notifications} notifications, as under hw ({hw_notifications}): the "
            "driver's I/O is the same; only what each notification costs differs.",
            show_lines=0,
        ),
        Step(
            "cpuvirt run netdemo --device virtio-net,backend=vhost --append bench -q --mode hw --summary vhost.json "
            "--trace vhost.jsonl",
            "The same run with the rings served by a vhost-style backend: the kick is matched against a notifier "
            "registered at set-up (the ioeventfd idea) and a worker handed the memory table and ring addresses "
            "serves the rings; the interrupt goes back through a registered injector (irqfd).",
            _backend("vhost"),
            "{vhost_exits} VM exits, as with the userspace device model ({hw_exits}): the "
            'guest\'s exit for the kick is the same; the trace says who took it: "{vhost_notify}".',
            show_lines=0,
        ),
        Step(
            "cpuvirt run netdemo --device virtio-net,backend=vhost-user --append bench -q --mode hw "
            "--summary vhost-user.json --trace vhost-user.jsonl",
            "And with a vhost-user backend: a separate process that mapped guest RAM from the file descriptors "
            "sent to it over a Unix socket, and is told of kicks over an eventfd.",
            _backend("vhost-user"),
            '{vhost-user_exits} VM exits again; the kick: "{vhost-user_notify}"; the '
            "backend process reported {vhost-user_used} used-ring updates, which cpuvirt learns of only through "
            "the call eventfd.",
            show_lines=0,
        ),
    ],
    questions=[
        Question(
            "q1",
            "How many notifications did the driver send for all its frames (step 1)?",
            lambda o: o["native_notifications"],
        ),
        Question(
            "q2", "How many VM exits did the frames cost through virtio-net under hw (step 3)?", lambda o: o["hw_exits"]
        ),
        Question("q3", "How many VM exits did the same bytes cost through COM1 (step 4)?", lambda o: o["com1_exits"]),
        Question(
            "q4",
            "The burst of 300 frames is larger than the 256-entry ring. What happens to the ring "
            "indices, and why do they never need to be reset? "
            "(Hint: they are free-running 16-bit counters.)",
        ),
        Question(
            "q5",
            "Steps 3, 6 and 7 cost the guest the same number of VM exits. On a real host, which "
            "costs differ between QEMU's device model, vhost-net in the host kernel and a vhost-user "
            "switch process (think: which thread wakes up, which address space the copy happens in, "
            "how many system calls per kick)?",
        ),
        Question(
            "q6",
            "How many used-ring updates did the vhost-user backend process report (step 7)?",
            lambda o: o["vhost-user_used"],
        ),
    ],
    extend="""
Change netdemo's burst (guests/netdemo.S) to send its frames one notification each (kick after every
frame) and run it under `hw --stats`: how many more VM exits, and how does it change the per-frame host
time of `python bench/virtio.py`? Then turn EVENT_IDX off in the driver and compare the interrupts.
""",
)
