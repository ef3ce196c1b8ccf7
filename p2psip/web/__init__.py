"""The browser side of a peer: the ring page (``/``), its JSON twin (``/status.json``), live updates by
Server-Sent Events (``/events``) and the softphone (``/phone``) built on JsSIP.

Served by :class:`p2psip.web.server.WebServer` when a peer runs with ``--http HOST:PORT``. The JavaScript
libraries come from npm (``npm install --prefix p2psip/web``, see the README): nothing from npm is
committed and nothing is fetched from a CDN at run time. This package knows nothing of the overlay: the
peer hands it a ``status()`` callable (layering, tests/test_layering.py).
"""
