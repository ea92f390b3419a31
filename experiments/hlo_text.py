"""Reading a compiled XLA module's text: which instructions launch kernels, of what kind, how
many bytes each touches, and where in the Python program each came from (its metadata's
op name and file:line), so profiles name the code behind a kernel.

Imported by bench_decode.py, bench_train.py and profile_decode.py (they run with
experiments/ on sys.path).
"""

import collections
import dataclasses
import re

import numpy as np

# HLO instructions that launch no kernel of their own.
_NO_KERNEL = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "while",
              "conditional", "call", "after-all", "opt-barrier", "partition-id", "replica-id"}

# An array type as HLO prints it: 'bf16[1,2048]'.
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel-launching instruction: its name, kind (`launch_kind`) and the bytes it
    moves: its operands plus its result, except where a fusion reads only slices of an
    operand (charged the slices) or writes a slice into an operand's buffer in place (a
    scan over stacked layers: charged the slice, not the buffer; `_fusion_bytes`), and
    where in the program it came from (`source`)."""
    name: str
    kind: str
    bytes: int
    source: str = ""


@dataclasses.dataclass(frozen=True)
class _Instruction:
    """One instruction of a computation: result bytes, opcode, operand names, and the
    parameter number for a `parameter(N)`."""
    bytes: int
    op: str
    operands: tuple[str, ...]
    parameter: int | None


def _balanced(text: str) -> int:
    """Index just past the parenthesis group text starts with ('(a, (b)) c' -> 8)."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return i + 1
    return len(text)


def _split(line: str) -> tuple[str, str, str] | None:
    """(result type, opcode, operand list) of one HLO instruction line
    ('%x = f32[2]{0} add(f32[2]{0} %a, f32[2]{0} %b), ...'), or None for other lines."""
    if " = " not in line:
        return None
    rest = line.split(" = ", 1)[1].lstrip()
    if rest.startswith("("):                     # a tuple shape
        end = _balanced(rest)
    else:
        end = rest.find(" ") if " " in rest else len(rest)
    result, rest = rest[:end], rest[end:]
    match = re.match(r"\s*([\w-]+)\(", rest)
    if not match:
        return None
    operands = rest[match.end() - 1:]
    return result, match.group(1), operands[1:_balanced(operands) - 1]


def _opcode(line: str) -> str | None:
    """The opcode of one HLO instruction line, or None."""
    parts = _split(line)
    return parts[1] if parts else None


def launch_kind(op: str, line: str) -> str:
    """'fusion:<kind>', 'custom-call:<target>' or op, for one launching instruction line."""
    if op == "fusion":
        kind = re.search(r"kind=(k\w+)", line)
        return f"fusion:{kind.group(1) if kind else '?'}"
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        return f"custom-call:{target.group(1) if target else '?'}"
    return op


# Installed libraries' frames (jax, flax, numpy): `stack_frames` names the caller instead.
_LIBRARY_PATH = re.compile(r"[/\\](site|dist)-packages[/\\]|[/\\]lib[/\\]python3")


def _short_path(path: str) -> str:
    """A file's last two path parts ('retnet_jax/layers.py')."""
    return "/".join(path.replace("\\", "/").split("/")[-2:])


def stack_frames(hlo_text: str) -> dict[str, str]:
    """{stack frame id: 'dir/file:line'} from a module's FileNames / FileLocations /
    StackFrames tables (what newer XLA prints once at the top, instructions then naming a
    `stack_frame_id`): the innermost frame outside installed libraries, so a matmul inside
    flax's `nnx.Linear` is named by the model line that called it (the innermost frame if
    all are library frames). A frame's printed parent_frame_id is its parent's id plus one
    (0: none), as XLA writes the tables."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in hlo_text.splitlines():
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = tables.setdefault(line.strip(), {})
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            section = None
        elif section is not None:
            key, _, value = line.strip().partition(" ")
            section[key] = value
    files, locations = tables.get("FileNames", {}), tables.get("FileLocations", {})
    raw = {frame: dict(re.findall(r"(\w+)=(\d+)", text))
           for frame, text in tables.get("StackFrames", {}).items()}

    def place(frame: str) -> tuple[str, str] | None:       # (path, line) of one frame
        location = dict(re.findall(r"(\w+)=(\d+)",
                                   locations.get(raw[frame].get("file_location_id", ""), "")))
        path = files.get(location.get("file_name_id", ""), "").strip('"')
        return (path, location["line"]) if path and "line" in location else None

    frames = {}
    for frame in raw:
        chain, current = [], frame
        while current in raw and len(chain) < 64:
            if (found := place(current)) is not None:
                chain.append(found)
            current = str(int(raw[current].get("parent_frame_id", "0")) - 1)
        ours = [c for c in chain if not _LIBRARY_PATH.search(c[0])]
        if chain:
            path, line = (ours or chain)[0]
            frames[frame] = f"{_short_path(path)}:{line}"
    return frames


def source_of(line: str, frames: dict[str, str] | None = None) -> str:
    """Where an instruction came from, from its metadata: 'op_name @ dir/file:line' (the
    JAX op's name path without its outer 'jit(...)/'; the file's last two path parts and
    line from source_file / source_line, or from its stack_frame_id in `frames`), the parts
    it has, or ''."""
    metadata = re.search(r'metadata=\{((?:[^{}"]|"(?:[^"\\]|\\.)*")*)\}', line)
    if not metadata:
        return ""
    fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\d+)', metadata.group(1)))
    op_name = fields.get("op_name", "").strip('"')
    op_name = op_name.split("/", 1)[1] if op_name.startswith("jit(") and "/" in op_name else (
        op_name)
    where = _short_path(fields.get("source_file", "").strip('"'))
    if where and "source_line" in fields:
        where += f":{fields['source_line']}"
    elif not where:
        where = (frames or {}).get(fields.get("stack_frame_id", ""), "")
    return " @ ".join(part for part in (op_name, where) if part)


def array_bytes(text: str) -> int:
    """Bytes of every array type written in text ('bf16[2,3]{1,0} %a, f32[4] %b' -> 28)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        bits = 8 if dtype == "pred" or dtype.startswith("f8") else int(dtype.lstrip("bsuf"))
        size = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
        total += size * bits // 8
    return total


def _operands(operands: str) -> list[str]:
    """The operands of an operand list, one string each ('/*index=5*/' marks dropped)."""
    return _top_level_split(re.sub(r"/\*.*?\*/", "", operands))


def _operand_name(operand: str) -> str:
    """'bf16[2,3]{1,0} %a' or '%a' -> 'a'."""
    return operand.split()[-1].lstrip("%") if operand.split() else ""


def _operand_bytes(operands: str, results: dict[str, int]) -> list[int]:
    """Bytes of each operand of an operand list: its printed type ('bf16[2,3]{1,0} %a'), or,
    where the text prints names alone ('%a', as GPU executables do), the named result's."""
    return [array_bytes(operand) or results.get(_operand_name(operand), 0)
            for operand in _operands(operands)]


def _instructions(lines: list[str]) -> tuple[dict[str, _Instruction], str | None]:
    """A computation's instructions by name, and its root's name."""
    found, root = {}, None
    for line in lines:
        parts = _split(line)
        if not parts:
            continue
        result, op, operands = parts
        name = line.split(" = ", 1)[0].split()[-1].lstrip("%")
        number = re.match(r"\s*(\d+)\s*$", operands) if op == "parameter" else None
        found[name] = _Instruction(array_bytes(result), op,
                                   tuple(_operand_name(o) for o in _operands(operands)),
                                   int(number.group(1)) if number else None)
        if line.lstrip().startswith("ROOT"):
            root = name
    return found, root


def _fusion_bytes(body: list[str], operand_bytes: list[int], result_bytes: int) -> int:
    """Bytes a fusion moves, read from its fused computation: each operand's bytes, but only
    the slices read where the body reads nothing of it except through (dynamic-)slices, and
    nothing for a buffer the body updates in place (a root dynamic-update-slice into a
    parameter, read by nothing else), whose written bytes are the update's, not the
    buffer's. Bitcasts are looked through."""
    instructions, root = _instructions(body)
    parameters = sorted(i.parameter for i in instructions.values() if i.parameter is not None)
    if root is None or parameters != list(range(len(operand_bytes))):
        return sum(operand_bytes) + result_bytes      # a body not read as expected: all of it

    def source(name: str) -> str:           # through bitcasts, to what produced the bytes
        while name in instructions and instructions[name].op == "bitcast":
            name = instructions[name].operands[0]
        return name

    users = collections.defaultdict(list)   # leaf users (bitcasts looked through)
    for name, instruction in instructions.items():
        if instruction.op != "bitcast":
            for position, operand in enumerate(instruction.operands):
                users[source(operand)].append((name, position))
    outputs = (instructions[root].operands if instructions[root].op == "tuple" else (root,))
    written, in_place = result_bytes, set()
    for output in (source(o) for o in outputs):
        update = instructions.get(output)
        if update and update.op == "dynamic-update-slice":
            base = source(update.operands[0])
            piece = instructions.get(source(update.operands[1]))
            if piece and base in instructions and instructions[base].parameter is not None:
                written -= update.bytes - piece.bytes
                in_place.add(base)
    read = 0
    for name, instruction in instructions.items():
        if instruction.parameter is None:
            continue
        slices, other = 0, False
        for user, position in users[name]:
            use = instructions[user]
            if use.op in ("slice", "dynamic-slice") and position == 0:
                slices += use.bytes
            elif not (name in in_place and use.op == "dynamic-update-slice" and position == 0):
                other = True
        full = operand_bytes[instruction.parameter]
        read += full if other else min(slices, full)
    return read + written


def _top_level_split(text: str) -> list[str]:
    """text split at the commas outside parentheses, braces and brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def launches(hlo_text: str) -> list[Launch]:
    """Every kernel-launching instruction that runs per call, read from a compiled module's
    text: the instructions of the entry computation and of the computations it runs as code
    (while bodies, calls, conditional branches; not fusion bodies, reducers or loop
    conditions), each while body once, without those that launch nothing (`_NO_KERNEL`).
    Each fusion, library call and unfused op is one launch."""
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            entry = name if line.startswith("ENTRY") else entry
            bodies[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            bodies[name].append(line)
    results = {}                    # every instruction's result bytes, by name
    for lines in bodies.values():
        for line in lines:
            parts = _split(line)
            if parts:
                results[line.split(" = ", 1)[0].split()[-1].lstrip("%")] = array_bytes(parts[0])
    frames = stack_frames(hlo_text)
    found, seen, todo = [], set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen or name not in bodies:
            continue
        seen.add(name)
        for line in bodies[name]:
            op = _opcode(line)
            if op is None:
                continue
            if op not in _NO_KERNEL:
                instruction = line.split(" = ", 1)[0].split()[-1].lstrip("%")
                result, _, operands = _split(line)
                operand_bytes = _operand_bytes(operands, results)
                callee = re.search(r"calls=%?([\w.-]+)", line) if op == "fusion" else None
                if callee and callee.group(1) in bodies:
                    nbytes = _fusion_bytes(bodies[callee.group(1)], operand_bytes,
                                           array_bytes(result))
                else:
                    nbytes = array_bytes(result) + sum(operand_bytes)
                found.append(Launch(instruction, launch_kind(op, line), nbytes,
                                    source_of(line, frames)))
            if op in ("while", "call", "conditional"):
                todo += re.findall(r"(?:body|to_apply|true_computation|false_computation)"
                                   r"=%?([\w.-]+)", line)
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                if branches:
                    todo += [c.strip().lstrip("%") for c in branches.group(1).split(",")]
    return found


def hlo_launches(hlo_text: str) -> collections.Counter:
    """Kernel launches per call by kind (`launches`), keyed 'fusion:<kind>' (kLoop,
    kInput: reductions, kCustom: e.g. Triton GEMMs), 'custom-call:<target>' (e.g.
    '__cublas$gemm') or the op's name. In a decode loop (a while body), per token."""
    return collections.Counter(launch.kind for launch in launches(hlo_text))
