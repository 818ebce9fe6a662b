"""The command line's groups, one module per use: ``research`` (simulate, benchmark, settings, privacy),
``data``, ``deploy`` (server, client), ``device`` (feedback, generate, export), ``chat``; ``common`` holds
what they share. ``fedpersona.cli`` assembles them."""
