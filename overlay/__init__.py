"""overlay: a Chord-style DHT that knows nothing of SIP.

It replaces the central SIP registrar and location service: signed entries are stored under 128-bit keys
on the node responsible for the key and its successors.
"""
