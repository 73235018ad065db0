"""Optimum CLI plugin file: makes ``optimum-cli export hf-sparse`` available once hf-sparse is installed.

Optimum 2.x imports every ``optimum/commands/register/*.py`` it finds in the ``optimum.commands.register``
namespace (PEP 420: no ``__init__.py`` here) and registers its ``REGISTER_COMMANDS``.
"""

from optimum.commands.export.base import ExportCommand

from hf_sparse.optimum.commands import HfSparseExportCommand

REGISTER_COMMANDS = [(HfSparseExportCommand, ExportCommand)]
