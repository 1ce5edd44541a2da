"""The guest toolchain: preprocessor, safe keystone assembly, Multiboot images, the guest list."""

from __future__ import annotations

import struct

import pytest
from capstone import CS_ARCH_X86, CS_MODE_32, Cs

from cpuvirt.errors import CpuvirtError, GuestBuildError, MultibootError
from cpuvirt.toolchain import assemble as assemble_mod
from cpuvirt.toolchain import (
    assemble_guest,
    build_all,
    build_guest,
    build_image,
    find_header,
    guest_source_dir,
    list_guests,
    preprocess_text,
)
from cpuvirt.toolchain.assemble import assemble
from cpuvirt.toolchain.preprocess import preprocess

BASE = 0x100000
EXPECTED_GUESTS = {"hello", "interrupts", "exceptions", "paging", "usermode", "holes", "nanobench"}


def _pp(text, defines=None, **kw):
    return preprocess_text(text, "t.S", defines or {}, **kw)


def _texts(pre):
    return [line.text.strip() for line in pre.lines]


def _asm_text(text, defines=None):
    return assemble(_pp(text, defines).lines, BASE)


def _stmt_bytes(asm, source):
    [s] = [s for s in asm.statements if s.source == source]
    return asm.code[s.addr - asm.base : s.addr - asm.base + s.size]


# ---------------------------------------------------------------------------------------------
# preprocessor


def test_define_object_like_whole_word_and_not_in_strings():
    pre = _pp('#define FOO 7\nmov eax, FOO\nmov eax, FOOBAR\nmov al, "FOO"\n.ascii "FOO"')
    assert _texts(pre) == ["mov eax, 7", "mov eax, FOOBAR", 'mov al, "FOO"', '.ascii "FOO"']


def test_define_nested_and_function_like_with_paste_and_uniq():
    pre = _pp(
        "#define BASE 0x10\n"
        "#define TWICE(x) ((x) * 2)\n"
        "#define LBL(n) label_##n: .long TWICE(BASE + n)\n"
        "#define U(x) u_##__UNIQ__: nop ; x\n"
        "LBL(3)\nU(ret)\nU(hlt)\n"
    )
    t = _texts(pre)
    assert t[0] == "label_3: .long ((0x10 + 3) * 2)"
    assert t[1].startswith("u_") and t[1].endswith("nop ; ret")
    assert t[1].split(":")[0] != t[2].split(":")[0]  # unique per expansion


def test_function_like_macro_arguments_with_commas_in_strings_and_brackets():
    pre = _pp('#define M(a, b) push b ; push a\nM("x, y", dword ptr [eax + 4])')
    assert _texts(pre) == ['push dword ptr [eax + 4] ; push "x, y"']


def test_conditionals_nest_and_follow_pv():
    src = (
        "#if PV\n"
        "  pv_a\n"
        "  #ifdef INNER\n    pv_inner\n  #else\n    pv_not_inner\n  #endif\n"
        "#elif OTHER == 2\n"
        "  other\n"
        "#else\n"
        "  native\n"
        "  #ifndef INNER\n    native_not_inner\n  #endif\n"
        "#endif\n"
        "after\n"
    )
    assert _texts(_pp(src, {"PV": 1})) == ["pv_a", "pv_not_inner", "after"]
    assert _texts(_pp(src, {"PV": 1, "INNER": ""})) == ["pv_a", "pv_inner", "after"]
    assert _texts(_pp(src, {"PV": 0})) == ["native", "native_not_inner", "after"]
    assert _texts(_pp(src, {"PV": 0, "OTHER": 2})) == ["other", "after"]
    assert "PV" in _pp(src, {"PV": 0}).condition_names
    assert _texts(_pp("#if defined(X) || !defined Y && (1 << 3) == 8\nyes\n#endif")) == ["yes"]


def test_comments_and_continuations():
    pre = _pp("# a comment\nnop # trailing\nnop // also\n#define L(x) \\\n  mov eax, x\nL(1)\n.ascii \"a#b\"")
    assert _texts(pre) == ["nop", "nop", "mov eax, 1", '.ascii "a#b"']


def test_include_and_line_map(tmp_path):
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "lib.inc").write_text("# lib\nlib_a\n#include \"sub.inc\"\nlib_b\n")
    (inc / "sub.inc").write_text("sub_a\n")
    (tmp_path / "local.inc").write_text("local_a\n")
    main = tmp_path / "main.S"
    main.write_text('first\n#include "lib.inc"\n\n#include "local.inc"\nlast\n')
    pre = preprocess(main, {}, [inc])
    got = [(line.file.rsplit("/", 1)[-1], line.line, line.text) for line in pre.lines]
    assert got == [
        ("main.S", 1, "first"),
        ("lib.inc", 2, "lib_a"),
        ("sub.inc", 1, "sub_a"),
        ("lib.inc", 4, "lib_b"),
        ("local.inc", 1, "local_a"),
        ("main.S", 5, "last"),
    ]


@pytest.mark.parametrize(
    "src,line,msg",
    [
        ("nop\n#if 1\nnop\n", 2, "unterminated conditional"),
        ("nop\n#else\n", 2, "#else without #if"),
        ("nop\nnop\n#endif\n", 3, "#endif without #if"),
        ('#include "nowhere.inc"\n', 1, "cannot find include file"),
        ("nop\n#error stop here\n", 2, "#error stop here"),
        ("#define F(a) a\nF(1, 2)\n", 2, "takes 1 argument"),
        ("#if 1 +\n#endif\n", 1, "#if"),
    ],
)
def test_preprocessor_errors_are_file_line(src, line, msg):
    with pytest.raises(GuestBuildError) as e:
        _pp(src)
    assert str(e.value).startswith(f"t.S:{line}: ")
    assert msg in str(e.value)


# ---------------------------------------------------------------------------------------------
# assembler errors


def test_assembly_error_reports_file_and_line(tmp_path):
    inc = tmp_path / "part.inc"
    inc.write_text("nop\nmov eax, 1\n")
    src = tmp_path / "bad.S"
    src.write_text('#include "part.inc"\nstart:\n    nop\n    xor eax, eax\n    frobnicate eax, 3\n    ret\n')
    with pytest.raises(GuestBuildError) as e:
        assemble(preprocess(src).lines, BASE)
    msg = str(e.value)
    assert msg.split(": ", 1)[0].endswith("bad.S:5"), msg
    assert "frobnicate" in msg


def test_error_in_included_file_names_that_file(tmp_path):
    (tmp_path / "lib.inc").write_text("nop\n\nmov eax, [[ebx]\n")
    src = tmp_path / "main.S"
    src.write_text('nop\n#include "lib.inc"\nnop\n')
    with pytest.raises(GuestBuildError) as e:
        assemble(preprocess(src).lines, BASE)
    assert str(e.value).split(": ", 1)[0].endswith("lib.inc:3")


def test_error_in_second_statement_of_a_line_and_macro_expansion():
    with pytest.raises(GuestBuildError) as e:
        _asm_text("nop\n#define BAD nop ; bogus_insn\nnop\nBAD\n")
    assert str(e.value).startswith("t.S:4: ")


def test_undefined_symbol_named_with_line():
    with pytest.raises(GuestBuildError) as e:
        _asm_text("a:\n  jmp a\n  mov eax, nowhere_defined\n  ret\n")
    assert str(e.value).startswith("t.S:3: ")
    assert "nowhere_defined" in str(e.value)


@pytest.mark.parametrize(
    "fill",
    [
        ".fill 0x20 - (. - start), 1, 0x90",  # keystone loops forever on these three
        ".skip 0x20 - (here - start), 0x90",
        ".space here - start, 0x90",
        ".zero 0x20 - (here - start)",  # ... and counts 0 on this one
    ],
)
def test_a_count_that_depends_on_a_label_is_an_input_error_not_a_hang(fill):
    with pytest.raises(GuestBuildError) as e:
        _asm_text(f"start:\n  nop\nhere:\n  {fill}\n  ret\n")
    assert str(e.value).startswith("t.S:4: ") and "constant count" in str(e.value)


def test_constant_counts_still_assemble():
    asm = _asm_text("start:\n  nop\n.set N, 5\n  .fill N, 1, 0x90\n  .skip 2, 0xCC\n  .zero 0x10 - 3\n  ret\n")
    assert asm.code == bytes([0x90] * 6 + [0xCC] * 2 + [0] * 13 + [0xC3])


def test_locating_an_error_leaves_keystone_sane():
    """Keystone 0.9.2 corrupts itself process-wide once a Ks with a sym_resolver is dropped
    (.zero 104 then emits 260 bytes); error location must not use one."""
    for _ in range(2):
        with pytest.raises(GuestBuildError):
            _asm_text("nop\nfrobnicate eax\n")
        with pytest.raises(GuestBuildError):
            _asm_text("nop\nmov eax, nowhere\n")
    asm = _asm_text("a:\n.zero 104\nb:\n")
    assert asm.symbols["b"] - asm.symbols["a"] == 104


def test_duplicate_label():
    with pytest.raises(GuestBuildError) as e:
        _asm_text("x:\nnop\nx: nop\n")
    assert str(e.value).startswith("t.S:3: ") and "already defined at t.S:1" in str(e.value)


def test_bss_takes_only_reservations():
    with pytest.raises(GuestBuildError) as e:
        _asm_text("nop\n.bss\nbuf: .zero 16\n  mov eax, 1\n")
    assert str(e.value).startswith("t.S:4: ")


def test_missing_entry_point_is_reported():
    with pytest.raises(GuestBuildError) as e:
        build_image(_pp("main:\n  ret\n").lines)
    assert "_start" in str(e.value) and str(e.value).startswith("t.S:1: ")


# ---------------------------------------------------------------------------------------------
# sections, symbols, line map


def test_sections_symbols_and_line_map():
    asm = _asm_text(
        ".text\nstart:\n  nop\n.data\nmsg: .asciz \"hi\"\n.bss\n.align 4096\nbig: .zero 8192\n"
        ".text\n  mov eax, msg\nend_text:\n"
    )
    sym = asm.symbols
    assert sym["start"] == BASE
    assert sym["end_text"] <= sym["msg"] < sym["__bss_start"] <= sym["big"]
    assert sym["big"] % 4096 == 0 and sym["__bss_end"] == sym["big"] + 8192
    assert len(asm.load_bytes) == sym["__bss_start"] - BASE  # the bss is not stored
    assert asm.locate(sym["start"]) == ("t.S", 3)
    mov = [s for s in asm.statements if s.source == "mov eax, msg"][0]
    assert asm.locate(mov.addr + 2) == ("t.S", 10)
    assert asm.code[mov.addr - BASE + 1 : mov.addr - BASE + 5] == struct.pack("<I", sym["msg"])


def test_sections_are_per_file(tmp_path):
    (tmp_path / "lib.inc").write_text(".data\nd: .long 1\n.bss\nb: .zero 4\n")
    src = tmp_path / "m.S"
    src.write_text('#include "lib.inc"\nmain: nop\n')  # back in .text here
    asm = assemble(preprocess(src).lines, BASE)
    assert asm.symbols["main"] < asm.symbols["d"] < asm.symbols["b"]


# ---------------------------------------------------------------------------------------------
# keystone mis-encodings: rewritten or refused, never silent

REWRITE_SOURCE = """
start:
  lgdt [desc]
  lidt [eax]
  sgdt [ebx + 4]
  sidt [desc]
  ljmp 0x08:target
  jmp 0x08:target
  jmp far 0x1B:0x12345678
  iret
  pushf
  popf
  push cs
  push ds
  pop ds
  push es
  pop es
  push ss
  pop ss
  push 0xFFFE
  push 0xFF80
  push target
  push 5
  rep movsd
target:
  nop
desc: .word 0x17
  .long 0x00123456
"""


def test_rewrites_give_the_32_bit_encodings():
    asm = _asm_text(REWRITE_SOURCE)
    t = asm.symbols["target"]
    d = asm.symbols["desc"]
    expect = {
        "lgdt [desc]": b"\x0f\x01\x15" + struct.pack("<I", d),
        "lidt [eax]": b"\x0f\x01\x18",
        "sgdt [ebx + 4]": b"\x0f\x01\x43\x04",
        "sidt [desc]": b"\x0f\x01\x0d" + struct.pack("<I", d),
        "ljmp 0x08:target": b"\xea" + struct.pack("<IH", t, 8),
        "jmp 0x08:target": b"\xea" + struct.pack("<IH", t, 8),
        "jmp far 0x1B:0x12345678": b"\xea" + struct.pack("<IH", 0x12345678, 0x1B),
        "iret": b"\xcf",
        "pushf": b"\x9c",
        "popf": b"\x9d",
        "push cs": b"\x0e",
        "push ds": b"\x1e",
        "pop ds": b"\x1f",
        "push es": b"\x06",
        "pop es": b"\x07",
        "push ss": b"\x16",
        "pop ss": b"\x17",
        "push 0xFFFE": b"\x68\xfe\xff\x00\x00",
        "push 0xFF80": b"\x68\x80\xff\x00\x00",
        "push target": b"\x68" + struct.pack("<I", t),
        "push 5": b"\x68\x05\x00\x00\x00",
        "rep movsd": b"\xf3\xa5",
    }
    for source, want in expect.items():
        got = _stmt_bytes(asm, source)
        # descriptor-table instructions keep their size: the freed prefix byte becomes a nop after
        assert got.rstrip(b"\x90") == want, (source, got.hex(" "))


def test_verifier_refuses_16_bit_forms_when_rewriting_is_bypassed(monkeypatch):
    """With the rewrites switched off, keystone's bad encodings must be caught by the verifier."""
    monkeypatch.setattr(assemble_mod, "_rewrite", lambda st: None)
    for stmt, what in [
        ("iret", "iret"),
        ("pushf", "0x66"),
        ("push cs", "0x66"),
        ("ljmp 0x08:0x100000", "far jump"),
        ("lgdt [0x1000]", "lgdt"),
        ("sidt [eax]", "sidt"),
        ("push 0xFFFE", "push imm8"),
    ]:
        with pytest.raises(GuestBuildError) as e:
            _asm_text(f"nop\nnop\n  {stmt}\nnop\n")
        assert str(e.value).startswith("t.S:3: "), (stmt, str(e.value))
        assert what in str(e.value), (stmt, str(e.value))


def test_push_dword_immediate_is_refused_with_advice():
    with pytest.raises(GuestBuildError) as e:
        _asm_text("nop\npush dword 5\n")
    assert str(e.value).startswith("t.S:2: ") and "0x66" in str(e.value) and "push 5" in str(e.value)


def test_explicit_16_bit_operands_are_allowed():
    asm = _asm_text("mov ax, cs\nmov ds, ax\nstr ax\nmov word ptr [eax], 5\nin ax, dx\ncwd\n")
    assert _stmt_bytes(asm, "mov ax, cs") == b"\x66\x8c\xc8"


# ---------------------------------------------------------------------------------------------
# the bundled guests


def test_list_guests():
    guests = {g.name: g for g in list_guests()}
    assert EXPECTED_GUESTS <= set(guests)
    for g in guests.values():
        assert g.description and "\n" not in g.description
        assert g.source == guest_source_dir() / f"{g.name}.S"


def test_unknown_guest_message():
    with pytest.raises(CpuvirtError) as e:
        build_guest("no-such-guest")
    names = ", ".join(g.name for g in list_guests())
    assert str(e.value) == f"unknown guest 'no-such-guest' (bundled guests: {names})"


def test_pv_build_of_a_guest_without_pv_code_is_refused():
    g = next(g for g in list_guests() if not g.has_pv)
    with pytest.raises(CpuvirtError):
        build_guest(g.name, pv=True)


def _all_builds():
    return [(g.name, pv) for g in list_guests() for pv in ((False, True) if g.has_pv else (False,))]


@pytest.fixture(scope="module")
def built():
    """name, pv -> (image, assembly), built once for the module."""
    return {(n, pv): assemble_guest(n, pv) for n, pv in _all_builds()}


def test_builds_are_deterministic(built, tmp_path):
    """Building again (here through build_all) gives the same bytes."""
    paths = build_all(tmp_path)
    by_name = {p.name: p.read_bytes() for p in paths}
    assert {f"{n}.bin" for n in EXPECTED_GUESTS} <= set(by_name)
    assert len(by_name) == len(built)
    for (name, pv), (image, _) in built.items():
        assert by_name[f"{name}{'.pv' if pv else ''}.bin"] == image, name


def _poison_keystone_radix() -> None:
    """Leave freed keystone memory that holds radix 16: ks_option sets it on every call (keystone
    0.9.2), and the next engine's never-initialized MCAsmInfo::Radix is read from that memory."""
    import gc

    from keystone import KS_ARCH_X86, KS_MODE_32, KS_OPT_SYNTAX_INTEL, Ks
    ks = Ks(KS_ARCH_X86, KS_MODE_32)
    ks.syntax = KS_OPT_SYNTAX_INTEL
    del ks
    gc.collect()


def test_keystone_engines_read_decimal_as_decimal_whatever_memory_they_get():
    """A guest image differed between two runs of one `compare` (paging under hw triple-faulted):
    the engine that built it read `PF_LIMIT 16` and `.zero 104` as hex. The poisoned allocator
    reproduces it for a plain Ks every time; new_keystone never hands such an engine out."""
    from keystone import KS_ARCH_X86, KS_MODE_32, Ks
    _poison_keystone_radix()
    assert bytes(Ks(KS_ARCH_X86, KS_MODE_32).asm(".long 10", 0)[0]) == b"\x10\0\0\0"   # the bug, shown
    for _ in range(5):
        _poison_keystone_radix()
        assert bytes(assemble_mod.new_keystone().asm(".long 10; .zero 104", 0)[0]) == b"\x0a\0\0\0" + bytes(104)


def test_a_guest_built_after_the_radix_is_poisoned_is_the_same(built):
    _poison_keystone_radix()
    assert assemble_guest("paging")[0] == built[("paging", False)][0]


def test_multiboot_header_of_every_guest(built):
    for (name, _pv), (image, asm) in built.items():
        off = image.find(struct.pack("<I", 0x1BADB002))
        assert 0 <= off < 8192 - 32 and off % 4 == 0, name
        magic, flags, csum, header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<8I", image, off)
        assert flags == 0x00010003, name  # page align, memory info, a.out kludge
        assert (magic + flags + csum) & 0xFFFFFFFF == 0, name
        assert load_addr == 0x100000 and header_addr == load_addr + off, name
        assert load_end == load_addr + len(image), name
        assert bss_end >= load_end, name
        assert entry == asm.symbols["_start"], name
        assert load_addr <= entry < load_end, name
        h = find_header(image)
        assert (h.entry_addr, h.load_end_addr, h.bss_end_addr) == (entry, load_end, bss_end)


def test_find_header_rejects_bad_images():
    image, _ = assemble_guest("hello")
    bad = bytearray(image)
    bad[8] ^= 1  # checksum
    with pytest.raises(MultibootError):
        find_header(bytes(bad))
    with pytest.raises(MultibootError):
        find_header(b"\0" * 9000)


def test_no_16_bit_descriptor_far_jump_or_iret_in_any_guest(built):
    """Decode each guest's image at every instruction statement (the toolchain's address map)
    with capstone, independently of the toolchain's own check."""
    cs = Cs(CS_ARCH_X86, CS_MODE_32)
    for (name, pv), (image, asm) in built.items():
        seen = {"lgdt": 0, "lidt": 0, "ljmp": 0, "iretd": 0}
        for s in asm.instructions():
            off = s.addr - 0x100000
            region = image[off : off + s.size]
            assert len(region) == s.size, (name, s.where)
            decoded = list(cs.disasm(region, s.addr))
            assert sum(i.size for i in decoded) == s.size, (name, s.where, region.hex(" "))
            for insn in decoded:
                raw = bytes(insn.bytes)
                k = 0
                while raw[k] in (0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67):
                    k += 1
                prefixes, op = raw[:k], raw[k:]
                if insn.mnemonic in seen:
                    seen[insn.mnemonic] += 1
                if insn.mnemonic in ("lgdt", "lidt", "sgdt", "sidt"):
                    assert 0x66 not in prefixes, (name, pv, s.where, raw.hex(" "))
                if op[:1] == b"\xea":
                    assert 0x66 not in prefixes, (name, pv, s.where, raw.hex(" "))
                    assert len(op) == 7, (name, s.where)  # EA off32 sel16
                if op[:1] == b"\xcf":
                    assert 0x66 not in prefixes, (name, pv, s.where, raw.hex(" "))
                assert raw[:2] != b"\x66\xcf" and raw[:2] != b"\x66\xea", (name, s.where)
        # every guest loads a GDT and IDT, far-jumps to reload CS and returns from interrupts; a PV
        # build (guests/include/pvops.inc) loads the tables through hypercalls instead
        if pv:
            assert seen["ljmp"] and seen["iretd"] and not (seen["lgdt"] or seen["lidt"]), (name, seen)
        else:
            assert all(seen.values()), (name, seen)


def test_toolchain_check_is_clean_for_every_guest(built):
    for (name, _pv), (_image, asm) in built.items():
        assert assemble_mod.check_encodings(asm) == [], name


def test_pv_guest_gets_two_builds(tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    (tmp_path / "pvdemo.S").write_text(
        "# description: a PV demo\n_start:\n#if PV\n  mov eax, 1\n#else\n  cli\n#endif\n  hlt\n"
    )
    (tmp_path / "plain.S").write_text("# description: no PV\n_start:\n  hlt\n")
    monkeypatch.setenv("CPUVIRT_GUESTS", str(tmp_path))
    info = {g.name: g for g in list_guests()}
    assert info["pvdemo"].has_pv and not info["plain"].has_pv
    assert info["pvdemo"].description == "a PV demo"
    paths = build_all(tmp_path / "out")
    assert sorted(p.name for p in paths) == ["plain.bin", "pvdemo.bin", "pvdemo.pv.bin"]
    assert build_guest("pvdemo", pv=True) != build_guest("pvdemo")
    with pytest.raises(CpuvirtError) as e:
        build_guest("x")
    assert str(e.value) == "unknown guest 'x' (bundled guests: plain, pvdemo)"


# --- the build cache (toolchain/cache.py) --------------------------------------------------------

def test_a_cached_build_is_served_without_assembling(tmp_path, monkeypatch):
    from cpuvirt.toolchain import build as build_mod
    monkeypatch.setenv("CPUVIRT_CACHE", str(tmp_path))
    first = build_guest("hello")
    assert first == assemble_guest("hello")[0]
    assert [p.name.split("-")[0] for p in (tmp_path / "guests").iterdir()] == ["hello"]

    def no_assembler(*_a, **_k):
        raise AssertionError("assembled although the cache holds this build")
    monkeypatch.setattr(build_mod, "assemble_guest", no_assembler)
    assert build_guest("hello") == first


def test_an_edited_include_or_guest_is_rebuilt(tmp_path, monkeypatch):
    import shutil
    src = tmp_path / "guests"
    shutil.copytree(guest_source_dir(), src, ignore=shutil.ignore_patterns("build", "*.bin"))
    monkeypatch.setenv("CPUVIRT_GUESTS", str(src))
    monkeypatch.setenv("CPUVIRT_CACHE", str(tmp_path / "cache"))
    before = build_guest("hello")
    source = src / "hello.S"
    source.write_text(source.read_text().replace("PASS(\"hello\")", "PASS(\"hello, edited\")"))
    edited = build_guest("hello")
    assert edited != before and b"hello, edited" in edited
    inc = src / "include" / "serial.inc"
    inc.write_text(inc.read_text() + "\n    nop\n")
    assert build_guest("hello") not in (before, edited)
    assert len(list((tmp_path / "cache" / "guests").iterdir())) == 1      # earlier builds of hello removed


@pytest.mark.parametrize("setting", ["off", "/dev/null/cannot-be-a-folder"])
def test_no_cache_or_an_unwritable_one_still_builds(tmp_path, monkeypatch, setting):
    monkeypatch.setenv("CPUVIRT_CACHE", setting)
    assert build_guest("hello") == assemble_guest("hello")[0]
