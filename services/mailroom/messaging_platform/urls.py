from django.contrib import admin
from django.contrib.auth.views import LogoutView
from django.urls import include, path

from email_service import health, metrics_views, unsubscribe_views
from email_service.api import api
from email_service.dashboard.access import LoginView

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_views.metrics, name="metrics"),
    path("u/<str:token>", unsubscribe_views.unsubscribe, name="unsubscribe"),
    path("api/", api.urls),
    path("admin/", admin.site.urls),
    path("dashboard/", include("email_service.dashboard.urls")),
    path("login/", LoginView.as_view(), name="login"),
    path("logout/", LogoutView.as_view(), name="logout"),  # POST only (Django 5)
]
