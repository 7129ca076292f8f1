"""The command line imports only the subcommand it runs, and its table of subcommands matches the modules."""
import argparse
import subprocess
import sys

import pytest

from llmlab import cli


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_module_registers_its_command_with_the_tables_help(name):
    module, help_text = cli.COMMANDS[name]
    parser = cli.build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered[name] == help_text
    assert len(sub.choices[name]._actions) > 1      # the real subparser, not the stub (which has only -h)


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_help_lists_every_command_without_importing_torch():
    out = run_python("import sys\nfrom llmlab.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
                     "    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    assert out.strip().endswith("NO-TORCH")
    for name in cli.COMMANDS:
        assert name in out


def test_a_command_imports_only_its_own_module():
    out = run_python("import sys\nfrom llmlab.cli import main\ntry:\n    main(['generate', '--help'])\n"
                     "except SystemExit:\n    pass\n"
                     "print(sorted(m for m in sys.modules if m.startswith(('llmlab.stages', 'fastapi', 'matplotlib'))))")
    assert "--prompt" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_an_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nonsense"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
