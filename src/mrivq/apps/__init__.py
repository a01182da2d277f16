"""The commands: each module reads top to bottom as the story of one ``mrivq`` command, and its
``main(args)`` is what ``mrivq <command>`` calls with the parsed arguments."""
