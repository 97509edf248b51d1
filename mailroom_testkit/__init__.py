"""What the tests, bench/ and chaos/ share: the roles started as processes through the
start scripts the image runs (``processes``), ``free_port`` and ``wait_until``, and the
recording SMTP sink (``smtp_sink``).

Importable from the repository root: pytest puts it on the path (pytest.ini's
``pythonpath``), ``make setup`` adds the root to the virtualenv (a ``.pth`` file) for
``python bench/<script>.py`` and ``python -m chaos.run``.
"""
