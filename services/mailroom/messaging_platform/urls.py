from django.contrib import admin
from django.urls import path

from email_service import health, metrics_views, unsubscribe_views
from email_service.api import api

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_views.metrics, name="metrics"),
    path("u/<str:token>", unsubscribe_views.unsubscribe, name="unsubscribe"),
    path("api/", api.urls),
    path("admin/", admin.site.urls),
]
