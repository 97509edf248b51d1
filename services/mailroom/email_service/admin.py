from django.contrib import admin

from email_service.models import Campaign, DeliveryAttempt, Message, Suppression


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("to_email", "subject", "queue", "status", "attempts", "created_at", "sent_at")
    list_filter = ("status", "queue")
    search_fields = ("to_email", "subject", "message_id_header")
    readonly_fields = [f.name for f in Message._meta.fields]


@admin.register(DeliveryAttempt)
class DeliveryAttemptAdmin(admin.ModelAdmin):
    list_display = ("message", "attempt", "outcome", "smtp_code", "created_at")
    list_filter = ("outcome",)
    readonly_fields = [f.name for f in DeliveryAttempt._meta.fields]


@admin.register(Campaign)
class CampaignAdmin(admin.ModelAdmin):
    list_display = ("name", "status", "created_at")
    list_filter = ("status",)


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    list_display = ("address", "reason", "created_at")
    list_filter = ("reason",)
    search_fields = ("address",)
