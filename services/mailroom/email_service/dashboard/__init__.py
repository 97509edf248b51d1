"""The operator dashboard: a live control room at ``/dashboard/``, staff only.

``figures`` reads (never writes) what the page shows; ``views`` renders it and turns
every control, a POST form, into a call to ``email_service.services``; ``access`` holds
the login (throttled) and the staff check; ``chart`` draws the throughput chart as SVG.
"""
