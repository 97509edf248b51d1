"""``/dashboard/``: the page, its data endpoint and the controls (POST only)."""

from django.urls import path

from email_service.dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.index, name="index"),
    path("data", views.data, name="data"),
    path("bulk/pause", views.bulk_pause, name="bulk-pause"),
    path("bulk/resume", views.bulk_resume, name="bulk-resume"),
    path("campaigns/<uuid:campaign_id>/start", views.campaign_start, name="campaign-start"),
    path("campaigns/<uuid:campaign_id>/pause", views.campaign_pause, name="campaign-pause"),
    path("campaigns/<uuid:campaign_id>/resume", views.campaign_resume, name="campaign-resume"),
    path("campaigns/<uuid:campaign_id>/cancel", views.campaign_cancel, name="campaign-cancel"),
    path("campaigns/<uuid:campaign_id>/retry", views.campaign_retry, name="campaign-retry"),
    path("suppressions/add", views.suppression_add, name="suppression-add"),
    path("suppressions/remove", views.suppression_remove, name="suppression-remove"),
]
