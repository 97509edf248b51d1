from django.contrib import admin
from django.urls import path

from email_service import health, unsubscribe_views

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("u/<str:token>", unsubscribe_views.unsubscribe, name="unsubscribe"),
    path("admin/", admin.site.urls),
]
