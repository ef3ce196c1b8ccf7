# ruff: noqa
# The article's per-user script, as written there (indentation restored; the `else:` belongs to the
# outer `if`). Installed as SCRIPTS_DIR/jones@example.com.py, it runs for every call to jones.
# transfer_to_voicemail is not in the article: define it above this text (the tests do).
def redirect_to_voicemail(event):
    event.location = URI('sip:jones@voicemail.example.com')
    event.action.redirect()

def proxy_then_voicemail(event):
    if event['From'].uri.host.endswith('example.com'):
        event.location = URI('sip:jones@example.com')
        e = event.action.proxy(timeout=10)
        if e in ('busy', 'noanswer', 'failure'): redirect_to_voicemail(event)
    else: transfer_to_voicemail(event)

basic.addEventListener('incoming', proxy_then_voicemail)
