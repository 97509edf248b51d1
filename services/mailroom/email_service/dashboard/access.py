"""Who may use the dashboard: staff users, signed in through a throttled login.

Throttling counts failed sign-ins per (username, client address) in Redis, from the
first failure for MAILROOM_LOGIN_WINDOW_SECONDS. Past MAILROOM_LOGIN_MAX_FAILURES,
:class:`ThrottledModelBackend` (the one AUTHENTICATION_BACKENDS) refuses every sign-in
of that pair, whichever form it comes from (the dashboard's or the admin's), and the
dashboard's login answers 429 without checking the password at all.

The client address is ``REMOTE_ADDR``: behind a reverse proxy every client has the
proxy's, and the limit works per username alone. If Redis does not answer, sign-ins are
not throttled (and a warning is logged): the passwords' slow hash still stands, and an
operator must be able to sign in to see that Redis is down.

``staff_page`` and ``staff_action`` guard every dashboard view; they also answer a 400
page to a query or form field holding a NUL character (``unstorable_field``), which
PostgreSQL could neither compare with nor store.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from functools import wraps
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth import views as auth_views
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse

from email_service import keys, redisstore
from email_service.validation import nul_field

logger = logging.getLogger(__name__)

View = Callable[..., HttpResponse]


class LoginThrottle:
    """The failure counter of one (username, client address) pair."""

    def __init__(self, username: str, address: str) -> None:
        # Hashed: the key holds neither the username nor the address in clear.
        digest = hashlib.sha256(f"{username.strip().lower()}\0{address}".encode()).hexdigest()
        self.key = keys.login_failures_key(digest[:32])

    @classmethod
    def of(cls, request: HttpRequest, username: object) -> LoginThrottle:
        return cls(str(username or ""), client_address(request))

    def wait_seconds(self) -> int:
        """Seconds until sign-ins are allowed again; 0 when they are now."""
        try:
            pipe = redisstore.client().pipeline(transaction=False)
            pipe.get(self.key)
            pipe.ttl(self.key)
            count, ttl = pipe.execute()
        except redis.RedisError:
            logger.warning("login throttle: Redis does not answer; not throttling")
            return 0
        if count is None or int(count) < settings.MAILROOM_LOGIN_MAX_FAILURES:
            return 0
        return max(int(ttl), 1)

    def failed(self) -> None:
        """Count one failure; the window starts at the first."""
        try:
            pipe = redisstore.client().pipeline(transaction=False)
            pipe.set(self.key, 0, ex=settings.MAILROOM_LOGIN_WINDOW_SECONDS, nx=True)
            pipe.incr(self.key)
            pipe.execute()
        except redis.RedisError:
            logger.warning("login throttle: Redis does not answer; failure not counted")

    def succeeded(self) -> None:
        try:
            redisstore.client().delete(self.key)
        except redis.RedisError:
            logger.warning("login throttle: Redis does not answer; counter not cleared")


def client_address(request: HttpRequest) -> str:
    return str(request.META.get("REMOTE_ADDR", ""))


class ThrottledModelBackend(ModelBackend):
    """Django's own backend, refusing a pair that failed too often before any password
    is checked (``PermissionDenied`` ends Django's backend loop and counts as a failed
    sign-in). Sign-ins without a request (``manage.py``, the test client's ``login``)
    are not throttled."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if request is not None:
            name = username if username is not None else kwargs.get(self._username_field(), "")
            if LoginThrottle.of(request, name).wait_seconds():
                raise PermissionDenied("too many failed sign-ins")
        return super().authenticate(request, username, password, **kwargs)

    @staticmethod
    def _username_field() -> str:
        return str(get_user_model().USERNAME_FIELD)


@receiver(user_login_failed, dispatch_uid="mailroom-login-failed")
def _count_failure(
    sender: object, credentials: dict[str, Any], request: HttpRequest | None = None, **_: Any
) -> None:
    if request is not None:
        LoginThrottle.of(request, credentials.get("username", "")).failed()


@receiver(user_logged_in, dispatch_uid="mailroom-logged-in")
def _clear_failures(sender: object, request: HttpRequest | None, user: Any, **_: Any) -> None:
    if request is not None:
        LoginThrottle.of(request, user.get_username()).succeeded()


class LoginView(auth_views.LoginView):
    """Django's login, answering 429 (with the wait) to a throttled pair."""

    template_name = "registration/login.html"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        wait = LoginThrottle.of(request, request.POST.get("username", "")).wait_seconds()
        if wait:
            response = render(
                request,
                "registration/throttled.html",
                {"minutes": math.ceil(wait / 60), "limit": settings.MAILROOM_LOGIN_MAX_FAILURES},
                status=429,
            )
            response["Retry-After"] = str(wait)
            return response
        return super().post(request, *args, **kwargs)


def _staff_only(view: View, *, back_here: bool) -> View:
    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        if not user.is_authenticated:
            # Controls and the data endpoint send the operator back to the page, not
            # to a URL that answers GET with 405 or JSON.
            back = request.get_full_path() if back_here else reverse("dashboard:index")
            return redirect_to_login(back)
        if not (user.is_active and user.is_staff):
            return render(request, "dashboard/forbidden.html", status=403)
        field = unstorable_field(request)
        if field is not None:
            context = {"field": field}
            return render(request, "dashboard/bad_request.html", context, status=400)
        return view(request, *args, **kwargs)

    return guarded


def unstorable_field(request: HttpRequest) -> str | None:
    """The name of the first query or form field holding a NUL character, or None.

    PostgreSQL refuses NUL in text (a query that compares with one fails, a row that holds
    one is not stored) and no address, search or note needs one: every view behind
    ``staff_page`` / ``staff_action`` is spared such input, and the operator gets a 400
    page naming the field instead of a 500.
    """
    return nul_field(request.GET, request.POST)


def staff_page(view: View) -> View:
    """Staff only; anonymous users sign in and come back to this page."""
    return _staff_only(view, back_here=True)


def staff_action(view: View) -> View:
    """Staff only; anonymous users sign in and land on the dashboard."""
    return _staff_only(view, back_here=False)
