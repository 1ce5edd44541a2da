"""Draws sensitive-instruction.svg: edit the rows, run `python make_sensitive_instruction.py`, commit both."""
ROWS = [
    ("native", ["guest runs mov cr3, eax at ring 0", "processor loads CR3", "TLB flushed, next instruction"], False),
    ("trap", ["guest runs mov cr3, eax at ring 1", "#GP: trap to the hypervisor", "decode, update the virtual CR3",
              "switch the shadow root", "skip it, resume the guest"], True),
    ("full", ["guest block holding mov cr3 is about to run", "translator emits a callout in its place",
              "callout: update the virtual CR3, switch the shadow root", "continue in the translation cache"], True),
    ("para", ["PV source says WRITE_CR3 (pvops)", "hypercall mmuext_op NEW_BASEPTR", "validate: a pinned L2 table?",
              "load it, return 0"], True),
    ("hw, EPT", ["guest runs mov cr3, eax in VMX non-root", "cr3_load_exiting = 0: no VM exit",
                 "processor loads CR3; EPT unchanged"], False),
    ("hw, --no-ept", ["guest runs mov cr3, eax in non-root ring 0", "VM exit CR_ACCESS (28): CR3, MOV to CR, eax",
                      "handler: the shadow root for the new CR3", "VM entry"], True),
]
W, ROWH, LEFT, GAP = 1000, 62, 120, 22


def wrap(text, width):
    lines, cur = [], ""
    for w in text.split():
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = (cur + " " + w).strip()
    return lines + [cur]


def main():
    h = 60 + ROWH * len(ROWS) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" '
           'font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
           '  <title>The life of one sensitive instruction (mov cr3, eax) in each mode</title>',
           '  <defs><marker id="head" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z" fill="#333"/></marker></defs>',
           f'  <text x="{W // 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">The life of '
           '<tspan font-family="DejaVu Sans Mono, monospace">mov cr3, eax</tspan> in each mode</text>',
           f'  <text x="{W // 2}" y="42" text-anchor="middle" fill="#555">blue: the guest\'s own step; red: the '
           'hypervisor works (a trace event); yellow: the processor alone, no hypervisor</text>']
    for i, (mode, steps, hv) in enumerate(ROWS):
        y = 58 + i * ROWH
        out.append(f'  <text x="12" y="{y + 27}" font-weight="bold" font-size="13">{mode}</text>')
        bw = (W - LEFT - 10 - GAP * (len(steps) - 1)) / len(steps)
        for k, step in enumerate(steps):
            x = LEFT + k * (bw + GAP)
            fill = "#e8f1fb" if k == 0 else ("#f6dcdc" if hv else "#fdf3d8")
            out.append(f'  <rect x="{x:.0f}" y="{y}" width="{bw:.0f}" height="44" rx="5" fill="{fill}" stroke="#777"/>')
            lines = wrap(step, int(bw / 6.8))
            for j, line in enumerate(lines):
                ty = y + 26 - 7 * (len(lines) - 1) + 14 * j
                out.append(f'  <text x="{x + bw / 2:.0f}" y="{ty:.0f}" text-anchor="middle">{line}</text>')
            if k < len(steps) - 1:
                out.append(f'  <path d="M{x + bw:.0f},{y + 22} L{x + bw + GAP - 2:.0f},{y + 22}" stroke="#333" '
                           'stroke-width="1.5" marker-end="url(#head)"/>')
    out.append(f'  <text x="12" y="{h - 12}" fill="#555">Each red step is one trace event: trap (trap), callout '
               '(full), hypercall (para), vmexit (hw). Try: cpuvirt compare paging --modes native,trap,full,hw</text>')
    out.append("</svg>")
    with open("sensitive-instruction.svg", "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
