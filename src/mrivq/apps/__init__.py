"""The commands: each module reads top to bottom as the story of one ``mrivq`` command; its
``add_arguments(parser)`` defines the command's flags (those several commands share come from
:mod:`mrivq.apps.flags`) and its ``main(args)`` is what ``mrivq <command>`` calls with them parsed."""
