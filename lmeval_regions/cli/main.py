"""``lmeval-regions``: the command line, generated from the configuration dataclasses.

Each subcommand is a :class:`Command`: a name, help text with examples, its *sections*
(``("model", ModelConfig)``, ``("corpus", CorpusConfig)``, its own options...) and a ``run``
function that receives the built sections. :mod:`.options` turns the sections into flags, so
every command that loads a model or reads a corpus takes the same flags with the same
defaults. ``--config FILE`` re-runs from a saved config; after a successful run the sections
are written next to the command's output (``<out>.config.yaml`` beside a file,
``<folder>/config.yaml`` in a folder), so any result can be repeated from its folder.

Errors: bad input (:class:`~lmeval_regions.errors.RegionsError`, or an ``OSError`` on a path
the user gave) prints one line and exits 2; Ctrl-C prints one line and exits 130; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmeval_regions import __version__
from lmeval_regions.artefacts import locked
from lmeval_regions.cli.options import (Section, add_sections, build_sections, read_config_file,
                                        save_run_config)
from lmeval_regions.errors import RegionsError
from lmeval_regions.models import ModelConfig, launcher

# Modules under lmeval_regions.cli.commands; each defines COMMANDS: list[Command].
GROUPS = ["core", "eval", "dims", "neurons", "studies", "data", "demo"]


@dataclass
class Files:
    """What a command reads and writes, checked (and the outputs locked) before it runs."""

    inputs: list[str] = field(default_factory=list)
    """Files read: they must exist, and are never written."""
    outputs: list[str] = field(default_factory=list)
    """Files written: never an input; an existing one is refused unless --overwrite."""
    folders: list[str] = field(default_factory=list)
    """Folders written into (reports, caches): they may exist, a second run resumes in them."""
    resumable: list[str] = field(default_factory=list)
    """Outputs the command itself reuses when they were made from the same inputs."""
    model: ModelConfig | None = None
    """The model the artefact inputs must fit (checked from its config, before any weight)."""


@dataclass
class Command:
    """One subcommand."""

    name: str
    help: str
    description: str
    """Shown by ``--help``: what it does, then ``example:`` lines."""
    sections: list[Section]
    run: Callable[[dict[str, Any]], "int | None"]
    output: Callable[[dict[str, Any]], "Path | None"] | None = None
    """The path of the run's config file (beside an output file, or inside an output folder)."""
    files: Callable[[dict[str, Any]], Files] | None = None
    """What the command reads and writes (see :class:`Files`)."""
    parallel: bool = False
    """Runs data parallel under ``accelerate launch`` / ``torchrun`` (rank 0 writes); other
    commands refuse to run in several processes."""


@dataclass
class RunOptions:
    """Flags about this invocation, not about the result (never saved in a config)."""

    overwrite: bool = False
    debug: bool = False
    quiet: bool = False


def commands() -> list[Command]:
    out: list[Command] = []
    for group in GROUPS:
        out += importlib.import_module(f"lmeval_regions.cli.commands.{group}").COMMANDS
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmeval-regions",
        description="Find, inspect, ablate and protect the linguistic regions of LLMs.\n"
                    "Flow: importance -> extract (regions) -> lm_eval --model hf-regions.\n"
                    "Every subcommand takes --config FILE (a saved run config) and --debug.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in commands():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML/JSON run config (as written beside every output); flags "
                             "given here override its values")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
        sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars")
        sp.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                        help="replace outputs that already exist (never an input)")
        add_sections(sp, cmd.sections)
        sp.set_defaults(_command=cmd)
    return p


def run_command(cmd: Command, ns: argparse.Namespace) -> int:
    """Build the sections (config file, then flags), run, and save the config beside the output."""
    given = {k: v for k, v in vars(ns).items() if "." in k}  # section.field flags only
    file_doc = None
    if "config" in vars(ns):
        file_doc = read_config_file(ns.config)
        named = file_doc.get("command", cmd.name)
        if named != cmd.name:
            raise RegionsError(f"--config '{ns.config}' is a config of '{named}', not of "
                               f"'{cmd.name}'; run `lmeval-regions {named} --config {ns.config}`")
    sections = build_sections(cmd.sections, argparse.Namespace(**given), file_doc,
                              source=f"--config {ns.config}" if file_doc is not None else "")
    run = RunOptions(**{k: bool(getattr(ns, k, False)) for k in ("overwrite", "debug", "quiet")})
    files = cmd.files(sections) if cmd.files else Files()
    target = cmd.output(sections) if cmd.output else None
    outputs = [*files.outputs, *([str(target)] if target is not None else [])]
    rank, world, _ = launcher()
    if world > 1 and not cmd.parallel:
        raise RegionsError(f"'{cmd.name}' runs in one process, but this is one of {world} "
                           "launched processes (accelerate launch / torchrun): run it without "
                           "the launcher (only importance and activations run data parallel)")
    check_files(files, outputs, run.overwrite)
    # Launched ranks: rank 0 holds the locks and writes; the others compute their share.
    with locked([*outputs, *files.folders]) if rank == 0 else contextlib.nullcontext():
        sections["run"] = run
        code = cmd.run(sections)
        del sections["run"]
        if target is not None and rank == 0:
            saved = save_run_config(target, cmd.name, sections)
            print(f"config: {saved}")
    return int(code or 0)


def check_files(files: Files, outputs: list[str], overwrite: bool) -> None:
    """Before any work: inputs exist and fit one model (and the model, from its config);
    outputs are not inputs, do not exist (unless --overwrite or resumable) and can be
    written."""
    from lmeval_regions.artefacts import check_same_model, read_metadata

    inputs = {}
    for p in files.inputs:
        if not Path(p).is_file():
            raise RegionsError(f"input '{p}' does not exist (or is not a file)")
        inputs[Path(p).resolve()] = p
    for p in [*outputs, *files.folders]:
        if Path(p).resolve() in inputs:
            raise RegionsError(f"output '{p}' is also an input of this command; writing it "
                               "would destroy the input: give another output path")
    for p in outputs:
        if Path(p).exists() and not overwrite and p not in files.resumable \
                and not str(p).endswith(".config.yaml") and Path(p).name != "config.yaml":
            raise RegionsError(f"output '{p}' already exists: give another path, or pass "
                               "--overwrite to replace it")
    for p in [*[str(Path(o).parent) for o in outputs], *files.folders]:
        folder = Path(p)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegionsError(f"cannot create the output folder '{folder}': "
                               f"{e.strerror or e}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RegionsError(f"cannot write into '{folder}': permission denied")
    artefacts = [p for p in files.inputs if p.endswith(".safetensors")]
    if len(artefacts) > 1:
        check_same_model(artefacts)
    if artefacts and files.model is not None:
        from lmeval_regions.artefacts import check_fingerprint
        from lmeval_regions.models import meta_model

        skeleton = meta_model(files.model)
        for p in artefacts:
            doc = read_metadata(p)
            if doc.get("model") and doc.get("kind") in ("region", "importance"):
                from safetensors import safe_open

                with safe_open(p, framework="pt") as f:
                    names = list(f.keys())
                check_fingerprint(doc["model"], skeleton, what=f"'{p}'", names=names)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd: Command = ns._command
    debug = getattr(ns, "debug", False)
    if getattr(ns, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it for every bar
    try:
        return run_command(cmd, ns)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"lmeval-regions {cmd.name}: interrupted", file=sys.stderr)
        return 130
    except (RegionsError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"lmeval-regions {cmd.name}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """A short message: OSErrors as 'strerror: filename', others as their text (capped)."""
    if isinstance(e, OSError) and not isinstance(e, RegionsError) and e.strerror:
        text = f"{e.strerror}: '{e.filename}'" if e.filename else e.strerror
    else:
        text = str(e)
    return text if len(text) <= 2000 else text[:2000] + " ..."


if __name__ == "__main__":
    sys.exit(main())
