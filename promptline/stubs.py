"""Typed views of the generated gRPC client stubs.

`make protos` writes type stubs (.pyi) for the messages only; the `*_pb2_grpc.py` stubs are
untyped. Each protocol here says what one service's methods take and return, so the calls a hop
makes and the frames it reads are type-checked. A generated stub satisfies its protocol as it is:
`engine: LlmEngineClient = llm_engine_pb2_grpc.LlmEngineStub(channel)`.
"""

from __future__ import annotations

from typing import Protocol

from grpc.aio import UnaryStreamCall, UnaryStreamMultiCallable, UnaryUnaryMultiCallable

from promptline.v1 import llm_engine_pb2, prompt_admin_pb2, prompt_pb2

GenerateCall = UnaryStreamCall[llm_engine_pb2.GenerateRequest, llm_engine_pb2.GenerateResponse]
"""One `LlmEngine.Generate` call in flight."""
ChatCall = UnaryStreamCall[prompt_pb2.StreamChatRequest, prompt_pb2.StreamChatResponse]
"""One `PromptService.StreamChat` call in flight."""
ResumeCall = UnaryStreamCall[prompt_pb2.ResumeChatRequest, prompt_pb2.StreamChatResponse]
"""One `PromptService.ResumeChat` call in flight: the same frames as a ChatCall."""


class LlmEngineClient(Protocol):
    """`llm_engine_pb2_grpc.LlmEngineStub`."""

    @property
    def Generate(self) -> UnaryStreamMultiCallable[llm_engine_pb2.GenerateRequest,
                                                   llm_engine_pb2.GenerateResponse]: ...


class PromptServiceClient(Protocol):
    """`prompt_pb2_grpc.PromptServiceStub`."""

    @property
    def StreamChat(self) -> UnaryStreamMultiCallable[prompt_pb2.StreamChatRequest,
                                                     prompt_pb2.StreamChatResponse]: ...

    @property
    def ResumeChat(self) -> UnaryStreamMultiCallable[prompt_pb2.ResumeChatRequest,
                                                     prompt_pb2.StreamChatResponse]: ...

    @property
    def CancelChat(self) -> UnaryUnaryMultiCallable[prompt_pb2.CancelChatRequest,
                                                    prompt_pb2.CancelChatResponse]: ...


class PromptAdminClient(Protocol):
    """`prompt_admin_pb2_grpc.PromptAdminStub`."""

    @property
    def CreatePromptVersion(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.CreatePromptVersionRequest, prompt_admin_pb2.PromptVersion]: ...

    @property
    def ListPromptVersions(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.ListPromptVersionsRequest,
            prompt_admin_pb2.ListPromptVersionsResponse]: ...

    @property
    def GetPromptVersion(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.GetPromptVersionRequest, prompt_admin_pb2.PromptVersion]: ...

    @property
    def SetPromptLabel(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.SetPromptLabelRequest, prompt_admin_pb2.SetPromptLabelResponse]: ...

    @property
    def GetConversation(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.GetConversationRequest, prompt_admin_pb2.Conversation]: ...

    @property
    def DeleteConversation(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.DeleteConversationRequest,
            prompt_admin_pb2.DeleteConversationResponse]: ...

    @property
    def GetUsage(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.GetUsageRequest, prompt_admin_pb2.UsageReport]: ...

    @property
    def SubmitFeedback(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.SubmitFeedbackRequest, prompt_admin_pb2.Feedback]: ...

    @property
    def GetPromptStats(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.GetPromptStatsRequest, prompt_admin_pb2.PromptStats]: ...

    @property
    def CreateEvalRun(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.CreateEvalRunRequest, prompt_admin_pb2.EvalRun]: ...

    @property
    def ListEvalRuns(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.ListEvalRunsRequest, prompt_admin_pb2.ListEvalRunsResponse]: ...

    @property
    def GetPromptPolicy(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.GetPromptPolicyRequest, prompt_admin_pb2.PromptPolicy]: ...

    @property
    def SetPromptPolicy(self) -> UnaryUnaryMultiCallable[
            prompt_admin_pb2.PromptPolicy, prompt_admin_pb2.PromptPolicy]: ...
